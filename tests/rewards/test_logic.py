"""Logic games: reasoning-gym records and rewards, with the entries' own solutions as oracles."""

import json

import pytest

import ring_jax.rewards  # noqa: F401
from ring_jax.rewards import logic
from ring_jax.rewards.registry import score


@pytest.fixture(scope="module", autouse=True)
def _warm():
    logic.warmup()  # import reasoning-gym once, outside the reward timeouts


def records(task, n=2, seed=7, **kw):
    recs = logic.make_records(task, n, seed, **kw)
    return json.loads(json.dumps(recs))  # records must survive JSON (what the data pipeline does)


def reward(record, response):
    res = score(record, response)
    assert res.error is None, res.error
    return res.reward


def tagged(ans):
    return f"<think>let me think</think>\n<answer>{ans}</answer>"


@pytest.mark.parametrize("task", logic.LOGIC_TASKS)
def test_make_records_schema_and_determinism(task):
    recs = records(task)
    assert len(recs) == 2
    for r in recs:
        assert r["task"] == task
        assert r["prompt"].endswith(logic.LOGIC_PROMPT_SUFFIX)
        assert isinstance(r["answer"], str) and r["answer"]
        assert r["gym"]["name"] == logic.TASK_DATASETS[task]
        assert r["gym"]["entry"]["answer"] == r["answer"]
        assert r["gym"]["config"]["seed"] == 7
    assert recs == records(task)
    assert recs != records(task, seed=8)


@pytest.mark.parametrize("task", logic.LOGIC_TASKS)
def test_reference_answer_scores_one(task):
    for r in records(task):
        assert reward(r, tagged(r["answer"])) == 1.0
        assert reward(r, "no answer given") < 0.05


def test_countdown_solution_from_metadata():
    for r in records("countdown", n=3, min_numbers=3, max_numbers=4):
        meta = r["gym"]["entry"]["metadata"]
        assert 3 <= len(meta["numbers"]) <= 4
        assert reward(r, tagged(meta["expression"])) == 1.0
        wrong = " + ".join(str(x) for x in meta["numbers"])
        assert eval(wrong) != meta["target"]  # noqa: S307  (precondition of this oracle)
        assert reward(r, tagged(wrong)) < 1.0
        assert reward(r, tagged(f"{meta['expression']} + 0")) < 1.0  # uses a number not given


def test_sudoku():
    for r in records("sudoku"):
        sol = r["gym"]["entry"]["metadata"]["solution"]
        assert len(sol) == 4  # mini_sudoku by default
        grid = "\n".join(" ".join(str(v) for v in row) for row in sol)
        assert reward(r, tagged(grid)) == 1.0
        bad = [row[:] for row in sol]
        bad[0][0], bad[0][1] = bad[0][1], bad[0][0]
        assert reward(r, tagged("\n".join(" ".join(str(v) for v in row) for row in bad))) < 1.0
    (big,) = records("sudoku", n=1, dataset="sudoku")
    assert big["gym"]["name"] == "sudoku" and len(big["gym"]["entry"]["metadata"]["solution"]) == 9
    assert reward(big, tagged(big["answer"])) == 1.0


def test_maze():
    for r in records("maze"):
        dist = r["gym"]["entry"]["metadata"]["shortest_path_length"]
        assert reward(r, tagged(str(dist))) == 1.0
        assert reward(r, tagged(str(dist + 1))) == 0.0


def test_arc():
    for r in records("arc"):
        out = r["gym"]["entry"]["metadata"]["test_example"]["output"]
        assert reward(r, tagged(" ".join(map(str, out)))) == 1.0
        flipped = [9 if v != 9 else 1 for v in out[:1]] + out[1:]
        assert reward(r, tagged(" ".join(map(str, flipped)))) < 1.0


def test_arithmetic_and_boxed_fallback():
    for r in records("arithmetic"):
        ans = r["answer"]
        assert reward(r, rf"so the result is \boxed{{{ans}}}") == 1.0  # no tag: last box
        assert reward(r, tagged(rf"\boxed{{{ans}}}")) == 1.0  # lone box inside the tag
        assert reward(r, tagged(str(int(ans) + 1))) == 0.0
        assert reward(r, f"<answer>{int(ans) + 1}</answer> ... <answer>{ans}</answer>") == 1.0  # last tag
    (cs,) = records("arithmetic", n=1, dataset="chain_sum")
    assert cs["gym"]["name"] == "chain_sum"
    assert reward(cs, tagged(cs["answer"])) == 1.0


def test_extract_answer():
    assert logic.extract_answer("<answer> 5 </answer>") == "5"
    assert logic.extract_answer("<answer>1</answer><ANSWER>2</ANSWER>") == "2"
    assert logic.extract_answer(r"x \boxed{3} y") == "3"
    assert logic.extract_answer(r"<answer>\boxed{1} + \boxed{2}</answer>") == r"\boxed{1} + \boxed{2}"
    assert logic.extract_answer("nothing") is None


def test_unknown_task():
    with pytest.raises(KeyError, match="countdown"):
        logic.make_records("tic_tac_toe", 1, 0)
