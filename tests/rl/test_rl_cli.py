"""ring-jax-rl end to end in a subprocess (tiny model): every step sees exactly the token budget, held-out pass@1 is
reported before and after, a checkpoint is written; bad flags fail in one line."""

import json
import os
import subprocess
import sys

from tests.flags import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ring_jax.cli.rl", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=400)


def test_rl_cli_runs_c3po_steps(tmp_path):
    from ring_jax.data import train_bpe
    from ring_jax.data.tasks import make_task_records

    recs = make_task_records("chain_sum", 200, seed=1)
    train_bpe([r["prompt"] + "\n" + r["solution"] for r in recs], vocab_size=300).save(str(tmp_path / "tok"))
    out = tmp_path / "run"
    r = _run(["--preset=tiny", f"--tokenizer={tmp_path / 'tok'}", "--tasks=chain_sum", "--eval_tasks=chain_sum",
              "--eval_prompts=4", "--eval_n=1", "--steps=2", "--budget=48", "--prompts_per_step=2",
              "--samples_per_prompt=4", "--max_new_tokens=16", "--seq_len=64", "--num_slots=8", "--lr=1e-3",
              "--progress_bar=false", f"--out_dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[eval before] held-out pass@1" in r.stdout and "[eval after]" in r.stdout
    steps = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:  # 2 prompts x 4 samples x up to 16 tokens >= 48 unless many stop at once
        assert s["kept_tokens"] + s["budget_shortfall"] == 48 and s["normalizer"] == 48
        assert s["responses"] == 8
    assert os.path.isdir(out / "ckpt" / "2")
    assert len([json.loads(x) for x in open(out / "eval.jsonl")]) == 2


def test_rl_cli_bad_flags_one_line(tmp_path):
    r = _run(["--preset=tiny", "--tasks=chain_sum", "--budget=0", f"--out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "budget" in r.stderr
    r = _run(["--preset=tiny", "--tasks=sokoban", f"--out_dir={tmp_path}"], tmp_path)
    assert r.returncode == 2 and "unknown task family" in r.stderr
    r = _run(["--preset=tiny", "--tasks=chain_sum", f"--reward_model={tmp_path / 'nope'}", f"--out_dir={tmp_path}"],
             tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--reward_model" in r.stderr, r.stderr
