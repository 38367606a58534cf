"""The entropy probe (Ring-lite's SFT checkpoint choice) against a NumPy oracle on the uncached full forward of each
response alone, and the pick rule of ring-jax-token-efficiency."""

import json

import numpy as np
import pytest

from ring_jax.cli.token_efficiency import TokenEffError, pick_checkpoint
from ring_jax.config import get_preset
from ring_jax.rl.probe import completion_entropy, make_entropy_fn, sample_for_entropy
from ring_jax.train.step import split_model
from tests.sampling.models import full_logits, random_model

CFG = get_preset("tiny")
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [3], [40, 41, 42, 43]]


def _oracle_entropy(model, comps):
    """Mean over response tokens of -sum p log p of the full forward's softmax, one sequence at a time (float64)."""
    ents = []
    for c in comps:
        ids = list(c.prompt_ids) + list(map(int, c.token_ids))
        lg = full_logits(model, ids).astype(np.float64)
        p0 = len(c.prompt_ids)
        for t in range(p0 - 1, len(ids) - 1):  # position t predicts token t + 1, a response token
            x = lg[t] - lg[t].max()
            logp = x - np.log(np.exp(x).sum())
            ents.append(-(np.exp(logp) * logp).sum())
    return float(np.mean(ents)), len(ents)


@pytest.fixture(scope="module")
def sampled():
    """One tiny random model, its sampled responses and their entropy, measured once (one compilation each)."""
    model = random_model(CFG, seed=3, scale=0.5)
    graphdef, _, params = split_model(model)
    comps = sample_for_entropy(graphdef, params, PROMPTS, n=3, max_new_tokens=10, seed=7, num_slots=8)
    fn = make_entropy_fn(graphdef)
    # 12 responses packed into 64-token rows, 2 rows per call: several calls, several documents per row
    probe = completion_entropy(graphdef, params, comps, seq_len=64, rows_per_call=2, entropy_fn=fn)
    return model, graphdef, params, comps, fn, probe


def test_entropy_equals_the_full_forward_oracle(sampled):
    model, _, _, comps, _, probe = sampled
    want, n_tok = _oracle_entropy(model, comps)
    assert probe.tokens == n_tok == sum(len(c.token_ids) for c in comps)
    assert probe.responses == len(comps) == 12
    np.testing.assert_allclose(probe.entropy, want, rtol=1e-5)
    assert 0.0 < probe.entropy < np.log(CFG.vocab_size)


def test_sampled_nll_estimates_the_entropy(sampled):
    """At T = 1 without top-p the sampler draws from the policy, so E[-log p(y_t)] = H_t: the mean over ~120 tokens
    lies within a few standard errors of the exact entropy (a sampler drawing from another distribution would not:
    -log p under a mismatched sampler is the cross-entropy, larger by the KL)."""
    comps, probe = sampled[3], sampled[5]
    nll = -np.concatenate([c.raw_logprobs for c in comps]).astype(np.float64)
    assert probe.sampled_nll == pytest.approx(nll.mean())
    se = nll.std() / np.sqrt(len(nll))
    assert abs(probe.sampled_nll - probe.entropy) < 4 * se + 0.05


def test_pick_rule_in_band_nearest_and_errors():
    ck = [
        {"name": "a", "sft_tokens": 1e5, "entropy": 0.55},
        {"name": "b", "sft_tokens": 2e5, "entropy": 0.45},
        {"name": "c", "sft_tokens": 3e5, "entropy": 0.35},
        {"name": "d", "sft_tokens": 4e5, "entropy": 0.2},
    ]
    got, why = pick_checkpoint(ck)
    assert got["name"] == "c" and "in the band" in why  # the most trained of those in band, not the highest entropy
    got, why = pick_checkpoint([ck[0], ck[3]])  # none in band: 0.55 is 0.05 above, 0.2 is 0.1 below
    assert got["name"] == "a" and "above" in why
    got, why = pick_checkpoint([ck[3], {"name": "e", "sft_tokens": 9e5, "entropy": 0.1}])
    assert got["name"] == "d" and "below" in why
    got, _ = pick_checkpoint(ck, entropy_band=(0.0, 1.0))
    assert got["name"] == "d"
    with pytest.raises(TokenEffError):
        pick_checkpoint([{"name": "x", "sft_tokens": 1.0, "entropy": None}])


def test_sft_tokens_are_cumulative_loss_tokens_of_the_logged_steps(tmp_path):
    from ring_jax.cli.sft_entropy import sft_tokens_by_step

    p = tmp_path / "metrics.jsonl"
    # out of order, one step without a token count, and a non-step record (the run's metadata line)
    p.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 2, "ce_tokens": 30.0},
                {"step": 1, "ce_tokens": 10.0},
                {"step": 3, "loss": 1.0},
                {"step": 4, "num_tokens": 5},
                {"meta": 1},
            ]
        )
        + "\n"
    )
    assert sft_tokens_by_step(str(p)) == {1: 10.0, 2: 40.0, 4: 45.0}
    with pytest.raises(FileNotFoundError, match="no SFT metrics"):
        sft_tokens_by_step(str(tmp_path / "none.jsonl"))


def test_report_lists_each_checkpoint_and_marks_the_pick():
    from ring_jax.cli.report import sft_checkpoint_table

    rows = [
        {"name": f"step{s}", "sft_tokens": 1000.0 * s, "entropy": e, "sampled_nll": e + 0.01, "mean_length": 20.0}
        for s, e in ((200, 0.31), (400, 0.12))
    ]
    picked, why = pick_checkpoint(rows)
    lines = sft_checkpoint_table(
        {
            "checkpoints": rows,
            "picked": picked["name"],
            "rule": why,
            "entropy_band": [0.3, 0.5],
            "prompts": 64,
            "samples": 4,
        }
    )
    assert lines[4] == "| step200 (picked) | 200000 | 0.3100 | 0.3200 | 20.0 |"
    assert lines[5] == "| step400 | 400000 | 0.1200 | 0.1300 | 20.0 |"
    assert "in the band" in lines[-2]


@pytest.mark.parametrize("case", ["no_dir", "no_prompts_file"])
def test_sft_entropy_cli_bad_input_is_one_line(tmp_path, case):
    from tests.train.cli_run import cli, cli_env, error_lines, finish

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"task": "chain_sum", "prompt": "1 + 2 =", "answer": "3"}) + "\n")
    (tmp_path / "empty").mkdir()
    args = {
        "no_dir": [f"--sft_dir={tmp_path}/none", f"--prompts_jsonl={prompts}"],
        "no_prompts_file": [f"--sft_dir={tmp_path}/empty", f"--prompts_jsonl={tmp_path}/none.jsonl"],
    }[case]
    want = {"no_dir": "no such directory", "no_prompts_file": "no such file"}[case]
    rc, _, err = finish(cli("ring_jax.cli.sft_entropy", args, cli_env(str(tmp_path / "cache"))), timeout=120)
    lines = error_lines(err)
    assert rc != 0 and len(lines) == 1 and want in lines[0], err[-2000:]
