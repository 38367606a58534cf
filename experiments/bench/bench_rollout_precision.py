"""What the issue-30 machinery costs a rollout, side by side in one process: the sampling engine on the main job's
``small`` preset at an RL batch size (by default 32 prompts x 8 samples on 256 rows), float32
weights, sampled at temperature 1:

  f32            float32 compute, no routing record (the engine before issue 30)
  f32 + record   float32 compute, each fed token's experts recorded (``record_routing=True``)
  bf16 + record  bfloat16 compute of the same float32 parameters, recorded (what --rollout_dtype=bfloat16 runs)

Variants are timed in turns (ROUNDS rounds, each variant once per round, after one warm-up call each), so the
machine's drift lands on all of them; the table gives the median seconds per generate call and the ratio to f32.

    python experiments/bench/bench_rollout_precision.py [--prompts 32] [--samples 8] [--new 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ring_jax.config import get_preset  # noqa: E402
from ring_jax.model import build_model  # noqa: E402
from ring_jax.sampling.engine import SamplingEngine  # noqa: E402
from ring_jax.sampling.types import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    cfg = get_preset("small")
    graphdef, state = nnx.split(build_model(cfg, seed=0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, cfg.vocab_size, a.prompt_len)) for _ in range(a.prompts)]
    sp = SamplingParams(max_new_tokens=a.new, n=a.samples, ignore_eos=True)
    slots = min(256, a.prompts * a.samples)
    variants = {
        "f32": dict(record_routing=False),
        "f32 + record": dict(record_routing=True),
        "bf16 + record": dict(record_routing=True, dtype="bfloat16"),
    }
    engines = {k: SamplingEngine(graphdef, state, num_slots=slots, **kw) for k, kw in variants.items()}
    times: dict = {k: [] for k in variants}
    for e in engines.values():  # warm-up: compile
        e.generate(prompts, sp, key=0)
    for r in range(a.rounds):
        for k, e in engines.items():
            t0 = time.perf_counter()
            e.generate(prompts, sp, key=r + 1)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["f32"])
    toks = a.prompts * a.samples * a.new
    print(
        f"small preset, {a.prompts} prompts x {a.samples} samples x {a.new} new tokens, {slots} slots, median of "
        f"{a.rounds} rounds"
    )
    print("| variant | s / generate | tok/s | vs f32 |")
    print("|---|---|---|---|")
    for k in variants:
        m = statistics.median(times[k])
        print(f"| {k} | {m:.2f} | {toks / m:.0f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
