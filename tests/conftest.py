"""Test set-up: 8 fake CPU devices and fast XLA compiles (tests/flags.py), which must happen before jax is imported
anywhere, and shared fixtures."""

import os
import tempfile

from tests.flags import with_fast_compile

os.environ["XLA_FLAGS"] = with_fast_compile(
    (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per pytest run, shared by its xdist workers: a program that several test files
# compile (the tiny preset's forward, train step, engine) is compiled once per run, not once per file and worker.
# Fresh for every run (keyed by xdist's run id), so nothing carries over between runs.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"ring_jax_tests_{_RUN_ID}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# pytest-xdist's loadfile scheduler hands whole files to the workers in queue order, and by default (loadscope
# reorder) it queues the files with the most tests first, which put the suite's most expensive files (few tests,
# each a CLI run or a big compile) last.  pyproject's addopts turn that reordering off (--no-loadscope-reorder) and
# this hook queues the files below first, most expensive first (one worker's seconds, 2-core box, 2026-12-03), the
# rest in collection order: longest-first bounds the gap between the two workers' finishing times by a cheap file.
# (A replay of an earlier full run's per-test durations through the scheduler balanced either order within 1%: this
# is a guard against a long file landing last when durations shift, not a measured speed-up.)
# tests/train/test_bad_input.py and tests/train/test_cli.py both need the session's SFT run (tests/train/conftest.py);
# they are kept apart in the queue so that they do not start together (one would wait idle on the other's lock).
SLOW_FILES_FIRST = [
    "tests/train/test_cli.py",  # ~110 s, and it builds the session's SFT run
    "tests/rl/test_rl_step.py",  # ~140 s
    "tests/rl/test_rl_cli.py",  # ~135 s
    "tests/rl/test_rl_schedule.py",  # ~60 s
    "tests/train/test_bad_input.py",  # ~70 s after the SFT run
    "tests/test_colab_notebook.py",  # ~55 s
    "tests/sharding/test_multihost.py",  # ~55 s
    "tests/model/test_model.py",
    "tests/model/test_grouped_xla.py",
    "tests/sampling/test_engine_golden.py",  # ~50 s
    "tests/sharding/test_expert_parallel.py",
    "tests/model/test_long_context.py",
    "tests/model/test_hf_parity.py",
    "tests/train/test_step.py",
    "tests/sampling/test_hf_cli.py",
    "tests/sampling/test_engine.py",
    "tests/rl/test_reward_model.py",
    "tests/sampling/test_engine_mesh.py",
    "tests/test_fit.py",
]


def pytest_collection_modifyitems(session, config, items):
    rank = {f: i for i, f in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: files stay contiguous
