"""Generated ifeval prompts: well-formed for the checker, deterministic, disjoint held-out sets, and the files shipped
in experiments/data are exactly what the generator writes."""

import json
import os

import pytest

from ring_jax.rewards import general
from ring_jax.rewards.ifeval_prompts import make_ifeval_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_records_are_valid_deterministic_and_excludable():
    recs = make_ifeval_records(100, seed=3)
    assert recs == make_ifeval_records(100, seed=3) and recs != make_ifeval_records(100, seed=4)
    assert len({r["prompt"] for r in recs}) == 100
    types = {c["type"] for r in recs for c in r["constraints"]}
    assert types == set(general.CONSTRAINT_CHECKS)
    for r in recs:
        assert r["task"] == "ifeval" and 1 <= len(r["constraints"]) <= 3
        assert 0.0 <= general.ifeval_reward(r, "some answer") <= 1.0  # every constraint is checkable
    held_out = make_ifeval_records(20, seed=3, exclude=[r["prompt"] for r in recs])
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in recs}
    with pytest.raises(ValueError, match="distinct prompts"):  # one constraint each: a few thousand prompts exist
        make_ifeval_records(10_000, seed=0, max_constraints=1)


def test_shipped_files_match_the_generator():
    def load(name):
        with open(os.path.join(ROOT, "experiments", "data", name)) as f:
            return [json.loads(line) for line in f]

    train = load("ifeval_small.jsonl")
    assert train == make_ifeval_records(200, seed=0)
    assert load("ifeval_small_eval.jsonl") == make_ifeval_records(64, seed=1, exclude=[r["prompt"] for r in train])
