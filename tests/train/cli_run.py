"""Running the training CLIs in subprocesses (one CPU device each), shared by tests/train/conftest.py (the
session's ``env`` and ``uninterrupted`` run) and the CLI tests."""

import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.flags import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = [
    "--preset=tiny",
    "--synthetic_corpus=300",
    "--seq_len=128",
    "--global_batch=4",
    "--micro_batches=2",
    "--steps=8",
    "--ckpt_every=2",
    "--keep=10",
    "--lr=3e-3",
    "--warmup_steps=2",
    "--peak_flops=0",
    "--progress_bar=false",
]
# an absl INFO / WARNING record ("I1202 20:16:29.361458 140405477485440 sft.py:100] ..."): not an error line
_LOG_RECORD = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def cli_env(cache_dir: str) -> dict:
    """One CPU device, fast compiles, and a persistent compilation cache in ``cache_dir`` (a program compiled by
    one run is loaded, not compiled, by the next)."""
    e = dict(os.environ)
    e.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=FAST_COMPILE,
        PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return e


def cli(module: str, args, env, **kw) -> subprocess.Popen:
    """``python -m <module> <args>`` started in the repository root, stdout and stderr captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def sft(args, env, **kw) -> subprocess.Popen:
    return cli("ring_jax.cli.sft", args, env, **kw)


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not absl INFO / WARNING records (a clean failure leaves exactly one,
    ``error: ...``)."""
    return [line for line in stderr.splitlines() if line.strip() and not _LOG_RECORD.match(line)]


def records(run_dir):
    """step -> the last record written for it (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["step"]] = r
    return out


def wait_for(cond, timeout, proc=None, what=""):
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process exited early ({proc.returncode}) waiting for {what}: {proc.stderr.read()[-3000:]}"
            )
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_at_checkpoint(p, run_dir, step: int, timeout) -> None:
    """SIGKILL ``p`` as soon as ``<run_dir>/ckpt/<step>`` exists (and in any case), then reap it."""
    try:
        wait_for(lambda: os.path.isdir(os.path.join(run_dir, "ckpt", str(step))), timeout, p, f"checkpoint {step}")
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
