"""The engine reproduces the tokens and log-probabilities of the engine before the decode-throughput work (issue 15):
greedy and sampled with fixed keys, with top-k / top-p and stop tokens, at slot counts that take different decode
MoE paths.  Golden file and the exact runs: tests/sampling/golden.py."""

import json

import numpy as np
import pytest

from tests.sampling import golden
from tests.sampling.models import random_model


@pytest.fixture(scope="module")
def runs():
    return golden.run_all(random_model(golden.config(), seed=3), golden.TEST_SLOTS)


@pytest.fixture(scope="module")
def want():
    with open(golden.GOLDEN) as f:
        return json.load(f)


def test_tokens_and_logprobs_equal_the_previous_engine(runs, want):
    assert set(runs) == {k for k in want if int(k.split("/")[0]) in golden.TEST_SLOTS}
    check_against_golden(runs, want)


def test_blocked_cache_attention_and_chunked_prefill_equal_the_previous_engine(want):
    """Cache blocks of 16 slots (the 64-slot cache read block by block, only up to the live length) and prompts
    prefilled 8 positions at a time (the 20-token prompt in 4 chunks, each over the blocks written before it): the
    golden tokens and log-probs still, at the 8-slot (capacity MoE) decode path."""
    model = random_model(golden.config().replace(cache_block=16), seed=3)
    check_against_golden(golden.run_all(model, (8,), prefill_chunk=8), want)


def test_pallas_decode_attention_equals_the_previous_engine(want):
    """Decode through the Pallas decode-attention kernel (interpret mode on CPU; each row's own live blocks of 16
    slots): the golden tokens and log-probs at the 2-slot decode path, greedy and sampled with top-p and stop tokens
    (two of the four cases: interpret mode is slow)."""
    model = random_model(golden.config().replace(cache_attn="pallas", cache_block=16), seed=3)
    check_against_golden(golden.run_all(model, (2,), cases=("greedy", "t1_topp095_stops")), want)


def check_against_golden(runs, want):
    for name in runs:
        assert len(runs[name]) == len(want[name]), name
        for got, ref in zip(runs[name], want[name]):
            where = f"{name} prompt {ref['prompt']} sample {ref['sample']}"
            assert (got["prompt"], got["sample"], got["finish"]) == (ref["prompt"], ref["sample"], ref["finish"]), where
            assert got["tokens"] == ref["tokens"], where
            np.testing.assert_allclose(got["logprobs"], ref["logprobs"], rtol=0, atol=2e-5, err_msg=where)
            np.testing.assert_allclose(got["raw_logprobs"], ref["raw_logprobs"], rtol=0, atol=2e-5, err_msg=where)


def test_the_golden_runs_are_not_trivial(want):
    """The file holds sampled (not all-greedy) rows that differ between samples, and some early stops."""
    t1 = want["8/t1"]
    assert len({tuple(r["tokens"]) for r in t1 if r["prompt"] == 0}) == 3
    assert any(r["finish"] == "stop" for r in want["8/t1_topp095_stops"])
    assert any(len(r["tokens"]) == 12 for r in want["2/greedy"])
