"""The ring-jax-sft CLI end to end, in subprocesses (one CPU device each): SIGKILL + --resume reproduces the
uninterrupted run's per-step losses bit for bit; SIGTERM checkpoints before exiting; bad flags fail in one line;
a checkpoint exports to an HF directory that reloads with identical logits."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

from tests.flags import with_fast_compile
from tests.helpers import logits as jit_logits
from tests.train.cli_run import BASE, ROOT, error_lines, finish, kill_at_checkpoint, records, sft, wait_for


def test_sigkill_then_resume_is_bit_exact(uninterrupted, env, tmp_path):
    run = str(tmp_path / "run_b")
    p = sft(BASE + [f"--out_dir={run}", "--step_delay_s=0.4"], env)
    kill_at_checkpoint(p, run, 4, 240)
    assert p.returncode == -signal.SIGKILL
    killed_at = max(records(run))
    assert killed_at < 8, "the run finished before it was killed"
    rc, out, err = finish(sft(BASE + [f"--out_dir={run}", "--resume"], env))
    assert rc == 0, err[-3000:]
    resumed_from = int(out.split("resumed from step ")[1].split()[0])
    assert 4 <= resumed_from < 8
    want, got = records(uninterrupted), records(run)
    assert sorted(got) == list(range(1, 9))
    for s in range(1, 9):
        for k in ("loss", "grad_norm", "token_loss", "lr", "num_tokens"):
            assert got[s][k] == want[s][k], (s, k, got[s][k], want[s][k])  # bit for bit


def test_sigterm_writes_a_checkpoint(env, tmp_path):
    run = str(tmp_path / "run_c")
    args = [a for a in BASE if not a.startswith("--ckpt_every")]  # same program as the cached one: no compiling
    p = sft(args + [f"--out_dir={run}", "--ckpt_every=0", "--step_delay_s=0.4"], env)
    metrics = os.path.join(run, "metrics.jsonl")
    try:
        wait_for(
            lambda: os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2, 240, p, "two logged steps"
        )
        p.send_signal(signal.SIGTERM)
        rc, out, err = finish(p, 120)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    last = max(records(run))
    assert last < 8
    assert f"checkpoint of step {last}" in out
    assert sorted(int(d) for d in os.listdir(os.path.join(run, "ckpt")) if d.isdigit()) == [last]


def test_bad_flags_fail_with_one_line(uninterrupted, env, tmp_path):
    two = dict(env, XLA_FLAGS=with_fast_compile("--xla_force_host_platform_device_count=2"))
    base = ["--synthetic_corpus=50", f"--out_dir={tmp_path}/x", "--peak_flops=0"]
    cases = [
        (base + ["--preset=bogus"], env, "unknown preset 'bogus'"),
        (base + ["--mesh=data:3"], env, "--mesh"),
        (base + ["--mesh=data:2", "--global_batch=6", "--micro_batches=2"], two, "multiple of data-parallel size 2"),
        (BASE + [f"--out_dir={uninterrupted}"], env, "pass --resume"),  # an existing run needs --resume
    ]
    procs = [(sft(a, e), want) for a, e, want in cases]  # concurrently: they fail before compiling anything
    for p, want in procs:
        rc, out, err = finish(p, 120)
        lines = error_lines(err)
        assert rc == 2 and "Traceback" not in err, err[-2000:]
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], err[-2000:]


def test_export_reloads_with_identical_logits(uninterrupted, tmp_path):
    from flax import nnx

    from ring_jax.cli.export import export_checkpoint
    from ring_jax.hf import load_pretrained
    from ring_jax.model.transformer import build_model
    from ring_jax.train.checkpoint import Checkpointer, model_config_from_meta
    from ring_jax.train.step import split_model

    ck = Checkpointer(os.path.join(uninterrupted, "ckpt"), read_only=True)
    cfg = model_config_from_meta(ck.read_meta(6))
    graphdef, _, abstract = split_model(nnx.eval_shape(lambda: build_model(cfg)))
    params = ck.restore_params(abstract, step=6).params
    ck.close()
    out, step = export_checkpoint(uninterrupted, str(tmp_path / "hf"), step=6, dtype="float32")
    assert step == 6 and os.path.isfile(os.path.join(out, "tokenizer.json"))
    model, cfg2 = load_pretrained(out)
    assert cfg2.vocab_size == cfg.vocab_size == 384
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)
    want = np.asarray(logits(params, tokens))
    got = np.asarray(logits(split_model(model)[2], tokens))
    np.testing.assert_array_equal(got, want)
    # and back: HF -> parameters-only orbax checkpoint (ring-jax-import) -> the same parameters
    from ring_jax.cli.import_ckpt import import_hf

    ckpt_dir = import_hf(out, str(tmp_path / "imported"))
    with Checkpointer(ckpt_dir, read_only=True) as ck:
        back = ck.restore_params(abstract)
    assert back.step == 0 and model_config_from_meta(back.meta) == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params), jax.device_get(params))
    assert os.path.isfile(str(tmp_path / "imported" / "tokenizer" / "tokenizer.json"))


def test_sample_cli_reads_an_orbax_checkpoint(uninterrupted, env, tmp_path):
    """ring-jax-sample --checkpoint_dir: greedy tokens equal argmax decoding by the restored model itself."""
    from ring_jax.cli.export import restore_model

    out = tmp_path / "s.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ring_jax.cli.sample",
            f"--checkpoint_dir={uninterrupted}",
            "--prompt_ids=5,6,7,8",
            "--temperature=0",
            "--max_new_tokens=5",
            "--ignore_eos",
            "--stream=false",
            f"--output_jsonl={out}",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text().splitlines()[0])["ids"]
    model, _, _ = restore_model(uninterrupted)
    ids = [5, 6, 7, 8]
    for _ in range(5):  # oracle: repeated argmax over the full uncached forward (zero-padded to one shape: causal)
        row = np.zeros((1, 9), np.int32)
        row[0, : len(ids)] = ids
        ids.append(int(np.argmax(jit_logits(model, row)[0, len(ids) - 1])))
    assert got == ids[4:]
