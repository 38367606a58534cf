"""ring-jax-rl end to end in subprocesses (tiny model, one CPU device, a compilation cache shared by the module's
runs): budgets and metrics against independent counts, SIGKILL + --resume with beta > 0 reproducing the
uninterrupted run bit for bit, and bad input failing in one line."""

import json
import os
import signal

import pytest

from tests.train.cli_run import cli, cli_env, finish, kill_at_checkpoint, records

PHI, STEPS, UPDATES = 48, 4, 2
# one 16-row MoE tile (the session SFT run of tests/train keeps the automatic ladder end to end); no --tokenizer:
# the run trains one on the prompts (the module docstring's example relies on it); two updates per
# rollout at top-p 0.9 (clip and TIS weights in play), beta > 0 (a KL reference to keep across the resume); updates
# without signal are taken, so the KL moves even though the untrained model never solves a task
BASE = [
    "--preset=tiny",
    "--moe_tile=16",
    "--tasks=chain_sum",
    "--num_prompts=200",
    "--eval_tasks=chain_sum",
    "--eval_prompts=4",
    "--eval_n=1",
    f"--steps={STEPS}",
    f"--budget={PHI}",
    f"--updates_per_rollout={UPDATES}",
    "--prompts_per_step=2",
    "--samples_per_prompt=4",
    "--max_new_tokens=16",
    "--seq_len=64",
    "--num_slots=8",
    "--lr=1e-3",
    "--beta=1e-3",
    "--top_p=0.9",
    "--skip_no_signal=false",
    "--ckpt_every=2",
    "--keep=10",
    "--progress_bar=false",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(str(tmp_path_factory.mktemp("jax_cache")))


def rl(args, env):
    return cli("ring_jax.cli.rl", args, env)


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("rl_a"))
    rc, out, err = finish(rl(BASE + [f"--out_dir={run}"], env), 400)
    assert rc == 0, err[-3000:]
    return run, out


def test_rl_cli_runs_c3po_updates(uninterrupted):
    run, out = uninterrupted
    assert "[eval before] held-out pass@1" in out and "[eval after]" in out
    assert os.path.isfile(os.path.join(run, "tokenizer", "tokenizer.json"))
    steps = records(run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    for s in steps.values():
        pool = round(s["response_len_mean"] * s["responses"])  # the rollout's tokens, counted independently
        assert s["responses"] == 8 and s["normalizer"] == PHI and s["updates"] == UPDATES
        assert s["kept_tokens"] == min(UPDATES * PHI, pool) and s["kept_tokens"] + s["discarded_tokens"] == pool
        for u in range(1, UPDATES + 1):
            for k in ("loss", "grad_norm", "clip_frac", "ratio_mean", "ratio_max", "approx_kl"):
                assert s[f"update/{u}/{k}"] is not None
        assert s["tis/weight_max"] <= 1.0 + 1e-6 and s["tis/weight_mean"] < 1.0  # top-p: pi_old / q = Z <= 1
    assert steps[STEPS]["kl"] > 0
    assert os.path.isdir(os.path.join(run, "ckpt", str(STEPS)))
    assert len([json.loads(x) for x in open(os.path.join(run, "eval.jsonl"))]) == 2
    init = json.load(open(os.path.join(run, "init.json")))
    assert init["preset"] == "tiny" and init["seed"] == 0 and init["params_checksums"]


def test_sigkill_then_resume_keeps_the_kl_reference_bit_exact(uninterrupted, env, tmp_path):
    """beta > 0: the resumed run rebuilds the initial policy as its KL reference, so losses, KL and rewards of
    the steps after the checkpoint equal the uninterrupted run's bit for bit (re-anchoring the reference on the
    restored parameters, or reusing donated buffers, fails this)."""
    run = str(tmp_path / "rl_b")
    p = rl(BASE + [f"--out_dir={run}", "--step_delay_s=1.0"], env)
    kill_at_checkpoint(p, run, 2, 300)
    assert p.returncode == -signal.SIGKILL
    assert max(records(run)) < STEPS, "the run finished before it was killed"
    rc, out, err = finish(rl(BASE + [f"--out_dir={run}", "--resume"], env), 400)
    assert rc == 0, err[-3000:]
    assert "resumed from step 2 of" in out
    want, got = records(uninterrupted[0]), records(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    keys = ["loss", "grad_norm", "kl", "entropy", "reward_mean", "kept_tokens", "tis/weight_mean"]
    keys += [f"update/{u}/{k}" for u in (1, 2) for k in ("loss", "ratio_mean", "approx_kl", "kl")]
    for s in range(3, STEPS + 1):
        for k in keys:
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])  # bit for bit
    assert got[STEPS]["kl"] > 0


def _one_error_line(err):
    lines = [x for x in err.splitlines() if x.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


def test_bad_input_fails_in_one_line(uninterrupted, env, tmp_path):
    """Each case fails before anything is trained: one `error:` line, no traceback; skipped prompts are named by
    file:line."""
    prompts = tmp_path / "prompts.jsonl"
    good = json.dumps({"task": "arithmetic", "prompt": "1 + 2 =", "answer": "3"})
    with open(prompts, "wb") as f:
        f.write((good + "\n").encode())
        f.write(b'{"task": "arithmetic", "prompt": \n')  # line 2: invalid JSON
        f.write(b'{"task": "arithmetic", "prompt": "\xff\xfe"}\n')  # line 3: not UTF-8
        f.write((json.dumps({"task": "no_such_task", "prompt": "hi"}) + "\n").encode())  # line 4: no reward
        f.write((json.dumps({"task": "arithmetic", "prompt_ids": [5] * 60}) + "\n").encode())  # line 5: too long
        f.write((good + "\n").encode())
    tok = os.path.join(uninterrupted[0], "tokenizer")
    common = ["--preset=tiny", f"--tokenizer={tok}", "--max_new_tokens=16", "--seq_len=64", "--progress_bar=false"]
    cases = [
        (common + [f"--prompts_jsonl={prompts}"], 1, "4/6 bad prompt records"),
        (common + ["--tasks=chain_sum", "--samples_per_prompt=0"], 2, "--samples_per_prompt must be >= 1"),
        (common + ["--tasks=chain_sum", "--steps=-1"], 2, "--steps must be >= 1"),
        (common + ["--tasks=chain_sum", "--budget=0"], 2, "--budget must be positive"),
        (common + ["--tasks=sokoban"], 2, "unknown task family"),
        (common + ["--tasks=chain_sum", f"--reward_model={tmp_path / 'nope'}"], 2, "--reward_model"),
        (common + ["--tasks=chain_sum", "--temperature=0"], 2, "--temperature must be > 0"),
        (common + ["--tasks=chain_sum", "--eval_only"], 2, "--eval_only needs held-out prompts"),
        (common + ["--tasks=chain_sum", "--max_new_tokens=64"], 2, "leaves no room for a prompt"),
        (BASE + [f"--out_dir={uninterrupted[0]}"], 2, "pass --resume"),
    ]
    procs = [
        (rl(a + ([] if any(x.startswith("--out_dir") for x in a) else [f"--out_dir={tmp_path}/o{i}"]), env), code, want)
        for i, (a, code, want) in enumerate(cases)
    ]
    errs = []
    for p, code, want in procs:
        rc, out, err = finish(p, 200)
        line = _one_error_line(err)
        assert rc == code and want in line, (rc, err[-3000:])
        errs.append(err)
    err = errs[0]  # the prompts file's warnings
    for n, reason in ((2, "bad_json"), (3, "bad_utf8"), (4, "unknown_task"), (5, "too_long")):
        assert f"{prompts}:{n}" in err and reason in err, err[-3000:]
    assert "leaves fewer than --max_new_tokens=16" in err
