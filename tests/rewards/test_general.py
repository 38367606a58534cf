"""General-domain rewards: rule-based instruction following and the reward-model interface."""

import pytest

import ring_jax.rewards  # noqa: F401
from ring_jax.rewards import general
from ring_jax.rewards.registry import score, score_batch


def ifeval(*constraints):
    return {"task": "ifeval", "prompt": "p", "constraints": list(constraints)}


@pytest.mark.parametrize(
    "constraint, good, bad",
    [
        ({"type": "max_words", "n": 3}, "one two three", "one two three four"),
        ({"type": "min_words", "n": 3}, "one two three", "one two"),
        ({"type": "include_keywords", "words": ["Apple", "pie"]}, "apple PIE is great", "apple pies"),
        ({"type": "exclude_keywords", "words": ["bad"]}, "badly done, good", "that is Bad."),
        ({"type": "lowercase"}, "all lower 123", "Not lower"),
        ({"type": "num_paragraphs", "n": 2}, "first para\nline\n\n  \nsecond", "one\nparagraph"),
        ({"type": "ends_with", "text": "Any questions?"}, "Done. Any questions?\n", "Any questions? Thanks"),
        ({"type": "json_format"}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ],
)
def test_each_constraint(constraint, good, bad):
    assert general.check_constraint(good, constraint)
    assert not general.check_constraint(bad, constraint)
    assert score(ifeval(constraint), good).reward == 1.0
    assert score(ifeval(constraint), bad).reward == 0.0


def test_fraction_and_thinking_stripped():
    rec = ifeval(
        {"type": "lowercase"},
        {"type": "max_words", "n": 5},
        {"type": "include_keywords", "words": ["moon"]},
        {"type": "ends_with", "text": "bye"},
    )
    # the upper-case, long reasoning before </think> is not checked
    resp = "<think>Long REASONING " + "word " * 50 + "</think>\nthe moon is bright"
    assert score(rec, resp).reward == pytest.approx(0.75)


def test_unknown_constraint_type():
    with pytest.raises(ValueError, match="no_commas"):
        general.ifeval_reward(ifeval({"type": "no_commas"}), "x")
    res = score(ifeval({"type": "max_words", "n": 9}, {"type": "no_commas"}), "x")
    assert res.reward == 0.0 and "no_commas" in res.error
    assert score(ifeval(), "x").error is not None  # no constraints
    assert score(ifeval({"type": "max_words"}), "x").error is not None  # missing n


class FakeRM:
    """Scores = length of the response, remembers the calls."""

    def __init__(self):
        self.calls = []

    def score_batch(self, prompts, responses):
        self.calls.append((list(prompts), list(responses)))
        return [float(len(r)) for r in responses]


@pytest.fixture
def fake_rm():
    rm = FakeRM()
    general.register_reward_model(rm)
    yield rm
    general.register_reward_model(None)


def rm_rec(prompt):
    return {"task": "reward_model", "prompt": prompt}


def test_reward_model_missing():
    general.register_reward_model(None)
    res = score(rm_rec("p"), "r")
    assert res.reward == 0.0 and "register_reward_model" in res.error
    with pytest.raises(TypeError):
        general.register_reward_model(object())


def test_reward_model_single_and_batch(fake_rm):
    assert isinstance(fake_rm, general.RewardModel)
    assert score(rm_rec("p0"), "abc").reward == 3.0
    assert fake_rm.calls == [(["p0"], ["abc"])]
    fake_rm.calls.clear()

    records = [rm_rec("p1"), {"task": "ifeval", "constraints": [{"type": "lowercase"}]}, rm_rec("p2")]
    results, stats = score_batch(records, ["aa", "ok", "bbbb"])
    assert fake_rm.calls == [(["p1", "p2"], ["aa", "bbbb"])]  # one model call per batch
    assert [r.reward for r in results] == [2.0, 1.0, 4.0]
    assert stats.per_task["reward_model"].count == 2
    assert stats.per_task["reward_model"].mean_reward == pytest.approx(3.0)


def test_reward_model_wrong_length():
    class Broken:
        def score_batch(self, prompts, responses):
            return [0.0]

    general.register_reward_model(Broken())
    try:
        results, stats = score_batch([rm_rec("a"), rm_rec("b")], ["x", "y"])
        assert all(r.reward == 0.0 and r.error for r in results)
        assert stats.per_task["reward_model"].n_errors == 2
    finally:
        general.register_reward_model(None)
