"""ring-jax-rl's precision flags as a new user runs them (issue 30's "Done means"): the tiny preset with a bfloat16
sampler, routing replay, IcePop and trainer pi_old logs the mismatch metrics under their names, with values that
say the sampler computed in bfloat16; a bad --icepop is one usage line.  (A float32 sampler agreeing exactly with
the trainer: tests/sampling/test_engine_routing.py, in process.)"""

import math

import pytest

from tests.train.cli_run import cli, cli_env, error_lines, finish, records

CMD = [
    "--preset=tiny",
    "--tasks=chain_sum",
    "--num_prompts=40",
    "--steps=2",
    "--budget=256",
    "--max_new_tokens=16",
    "--progress_bar=false",
]
KEYS = (
    "mismatch/logp_abs_mean",
    "mismatch/logp_abs_max",
    "mismatch/kl",
    "mismatch/ratio_out_2x_frac",
    "mismatch/routing_disagree_frac",
    "icepop/masked_frac",
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(str(tmp_path_factory.mktemp("jax_cache")))


def test_precision_flags_log_the_mismatch(tmp_path, env):
    flags = ["--rollout_dtype=bfloat16", "--routing_replay", "--icepop=0.5,2.0", "--old_logp=trainer"]
    out = tmp_path / "run"
    code, _, err = finish(cli("ring_jax.cli.rl", CMD + flags + [f"--out_dir={out}"], env), timeout=400)
    assert code == 0, err[-3000:]
    recs = records(out)
    assert sorted(recs) == [1, 2]
    for r in recs.values():
        for k in KEYS:
            assert k in r and r[k] is not None and math.isfinite(r[k]), (k, r.get(k))
        # bfloat16 compute moves the sampler's log-probs by ~1e-3 nats on the tiny model (float32: ~1e-7)
        assert r["mismatch/logp_abs_mean"] > 1e-4 and r["mismatch/logp_abs_max"] > 1e-3


def test_bad_icepop_is_one_usage_line(tmp_path, env):
    code, _, err = finish(cli("ring_jax.cli.rl", CMD + ["--icepop=2,0.5", f"--out_dir={tmp_path}/r"], env))
    lines = error_lines(err)
    assert code != 0 and len(lines) <= 2 and any("icepop" in x for x in lines), err[-2000:]
