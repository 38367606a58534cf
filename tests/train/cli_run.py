"""Running the training CLIs in subprocesses (one CPU device each), shared by tests/train/conftest.py (the
session's ``env`` and ``uninterrupted`` run) and the CLI tests."""

import os
import re
import subprocess
import sys

from tests.flags import FAST_COMPILE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ["--preset=tiny", "--synthetic_corpus=300", "--seq_len=128", "--global_batch=4", "--micro_batches=2",
        "--steps=8", "--ckpt_every=2", "--keep=10", "--lr=3e-3", "--warmup_steps=2", "--peak_flops=0",
        "--progress_bar=false"]
# an absl INFO / WARNING record ("I1202 20:16:29.361458 140405477485440 sft.py:100] ..."): not an error line
_LOG_RECORD = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def cli_env(cache_dir: str) -> dict:
    """One CPU device, fast compiles, and a persistent compilation cache in ``cache_dir`` (a program compiled by
    one run is loaded, not compiled, by the next)."""
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE, PYTHONPATH=ROOT + os.pathsep + e.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return e


def cli(module: str, args, env, **kw) -> subprocess.Popen:
    """``python -m <module> <args>`` started in the repository root, stdout and stderr captured as text."""
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def sft(args, env, **kw) -> subprocess.Popen:
    return cli("ring_jax.cli.sft", args, env, **kw)


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not absl INFO / WARNING records (a clean failure leaves exactly one,
    ``error: ...``)."""
    return [line for line in stderr.splitlines() if line.strip() and not _LOG_RECORD.match(line)]
