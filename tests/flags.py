"""XLA flags for the test process (conftest.py) and for the subprocesses tests start.  No imports: this is read
before jax is imported.

The suite's models are tiny, so XLA's compile time, not the computation, dominates it.  Optimisation level 0 for the
LLVM code XLA emits for each CPU kernel compiles about 3x faster (measured: a tiny-model build went from 31 compiles
in 8.3 CPU-s to 2.9 CPU-s; BUILD_NOTES.md, "Test suite").  The compiled HLO graph is the same; only each kernel's
machine code is less optimised, which may move a float result by an ulp (e.g. no FMA contraction), so every process
whose results a test compares uses the same flags.  To run the suite at the default level:
``XLA_FLAGS=--xla_backend_optimization_level=2 python -m pytest``.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_fast_compile(flags: str = "") -> str:
    """``flags`` plus FAST_COMPILE unless it already names an optimisation level."""
    if "xla_backend_optimization_level" in flags:
        return flags
    return f"{flags} {FAST_COMPILE}".strip()
