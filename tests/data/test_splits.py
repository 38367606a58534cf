"""Held-out by construction: no eval problem reaches the SFT corpus or the RL prompts, checked on the files the
pipeline writes with an oracle that reads the problems back from the prompt text (not from the split code)."""

import json
import re

import pytest

from ring_jax.data import splits
from ring_jax.data.tasks import make_task_records


def oracle_key(prompt: str) -> str:
    """The problem a prompt text states, parsed from the text alone."""
    m = re.fullmatch(r"Use ((?:\d+ ?)+) to make (\d+)\.", prompt.strip())
    if m:
        return "countdown:" + ",".join(sorted(m.group(1).split(), key=int)) + "->" + m.group(2)
    m = re.fullmatch(r"(.*) =", prompt.strip())
    assert m, prompt
    return "chain_sum:" + " ".join(m.group(1).split())


def test_held_out_side_is_a_fixed_share_of_keys():
    keys = [f"k{i}" for i in range(20_000)]
    share = sum(map(splits.is_held_out, keys)) / len(keys)
    assert abs(share - splits.HELD_OUT_FRACTION) < 0.015
    assert [splits.is_held_out(k) for k in keys[:200]] == [splits.is_held_out(k) for k in keys[:200]]
    assert not any(splits.is_held_out(k, 0.0) for k in keys[:500]) and all(
        splits.is_held_out(k, 1.0) for k in keys[:500]
    )


def test_countdown_key_is_the_number_multiset_and_target():
    a = {"task": "countdown", "gym": {"entry": {"metadata": {"numbers": [3, 7, 5], "target": 26}}}}
    b = {"task": "countdown", "gym": {"entry": {"metadata": {"numbers": [5, 3, 7], "target": 26}}}}
    c = {"task": "countdown", "gym": {"entry": {"metadata": {"numbers": [3, 7, 5], "target": 25}}}}
    assert splits.problem_key(a) == splits.problem_key(b) != splits.problem_key(c)
    assert splits.problem_key({"prompt": "  What IS 2+2? "}) == splits.problem_key({"prompt": "what is  2+2?"})
    assert (
        splits.problem_key({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}]})
        == "text:hi"
    )


def test_generated_splits_are_disjoint_whatever_the_seeds():
    train = make_task_records("chain_sum_1d", 1500, seed=1, split="train")
    held = make_task_records("chain_sum_1d", 300, seed=1, split="eval", distinct=True)  # same seed on purpose
    tk = {oracle_key(r["prompt"]) for r in train}
    hk = [oracle_key(r["prompt"]) for r in held]
    assert len(set(hk)) == len(hk) == 300  # distinct problems
    assert not tk & set(hk)
    assert all(splits.is_held_out(r["problem_key"]) for r in held)
    # the oracle has teeth: without the split the same draws do overlap the held-out problems
    unsplit = {oracle_key(r["prompt"]) for r in make_task_records("chain_sum_1d", 1500, seed=1)}
    assert unsplit & set(hk)


def test_a_split_the_space_cannot_fill_names_the_family(monkeypatch):
    from ring_jax.data import tasks

    monkeypatch.setattr(tasks, "_MAX_ROUNDS", 2)
    with pytest.raises(ValueError, match="chain_sum_1d: only .* distinct problems on the eval side"):
        make_task_records("chain_sum_1d", 1500, seed=0, split="eval", distinct=True)
    with pytest.raises(ValueError, match="split must be"):
        make_task_records("chain_sum_1d", 5, seed=0, split="test")


def test_overlap_finds_shared_problems_and_texts():
    train = [
        {"prompt": "What is 2 + 2?"},
        {
            "task": "countdown",
            "prompt": "Use 1 2 3 to make 6.",
            "gym": {"entry": {"metadata": {"numbers": [1, 2, 3], "target": 6}}},
        },
    ]
    held = [
        {"prompt": "what is 2 +  2?"},
        {"prompt": "What is 3 + 3?"},
        {
            "task": "countdown",
            "prompt": "Use 3 2 1 to make 6.",
            "gym": {"entry": {"metadata": {"numbers": [3, 2, 1], "target": 6}}},
        },
    ]
    assert splits.overlap(train, held) == [0, 2]


def test_pipeline_files_hold_no_eval_problem(tmp_path):
    """The files ``ring-jax-pipeline`` writes, with its default families (counts cut for the test's time)."""
    from ring_jax.cli import pipeline

    fams = pipeline.DEFAULT_FAMILIES
    w = pipeline.write_task_files(str(tmp_path), fams, sft_examples=200, rl_prompts=150, eval_prompts=100, seed=0)
    p = w["paths"]
    sft = [json.loads(x) for x in open(p["sft"])]
    rl = [json.loads(x) for x in open(p["rl_prompts"])]
    ev = [json.loads(x) for x in open(p["eval"])]
    assert len(sft) == 200 * len(fams) and len(rl) == 150 * len(fams) and len(ev) == 100 * len(fams)
    train_text = [m["messages"][0]["content"] for m in sft] + [r["prompt"] for r in rl]
    eval_text = [r["prompt"] for r in ev]
    train_keys = {oracle_key(t) for t in train_text}
    eval_keys = [oracle_key(t) for t in eval_text]
    assert len(set(eval_keys)) == len(eval_keys)
    assert not train_keys & set(eval_keys)  # generator parameters
    assert not {splits.canonical_text(t) for t in train_text} & {splits.canonical_text(t) for t in eval_text}
    assert {r["family"] for r in ev} == set(fams)
    # every SFT solution is complete (no injected truncation by default) and right by the task's scorer
    assert all(m["messages"][1]["content"].rsplit("\n", 1)[-1].startswith("<answer>") for m in sft)
