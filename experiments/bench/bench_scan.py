"""Scanned against unrolled decoder layers, side by side in one process (issue 17): the same stacked parameters run
as one ``lax.scan`` (``scan_layers=True``, the default) or unrolled (``scan_layers=False``: the program the layers
compiled to before they were stacked).  Per setting: seconds to compile, then the SFT train step (the main job's
shape: small preset, 8 x 256 tokens, AdamW, one device) and engine decode (64 prompts x 64 new tokens, greedy) timed
in interleaved rounds; the ratios scan / unrolled are medians over the paired rounds.

    python experiments/bench/bench_scan.py [--preset=small] [--rounds=5] [--steps=5]
"""

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx
from train_adapter import bench_adapter  # this folder (the script's own, first on sys.path)

from ring_jax.config import get_preset
from ring_jax.model import build_model
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new_tokens", type=int, default=64)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    modes = {"scan": True, "unrolled": False}
    cfgs = {m: get_preset(a.preset, scan_layers=v) for m, v in modes.items()}
    v = cfgs["scan"].vocab_size
    tokens = rng.integers(2, v, (a.batch, a.seq))
    prompts = [list(rng.integers(2, v, 32)) for _ in range(a.prompts)]
    sp = SamplingParams(temperature=0.0, max_new_tokens=a.new_tokens, ignore_eos=True)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}; preset {a.preset} "
        f"({cfgs['scan'].num_hidden_layers} layers); SFT step {a.batch} x {a.seq}; decode {a.prompts} prompts x "
        f"{a.new_tokens} new tokens, greedy"
    )
    steps, engines, compile_s = {}, {}, {}
    for m, cfg in cfgs.items():
        t0 = time.perf_counter()
        steps[m] = bench_adapter(cfg)
        float(steps[m](tokens))
        t1 = time.perf_counter()
        model = build_model(cfg, 0)
        engines[m] = SamplingEngine(*nnx.split(model), num_slots=a.prompts, chunk=32)
        engines[m].generate(prompts, sp, key=0)
        compile_s[m] = (t1 - t0, time.perf_counter() - t1)
    same = [
        x.token_ids.tolist() == y.token_ids.tolist()
        for x, y in zip(engines["scan"].generate(prompts, sp, key=0), engines["unrolled"].generate(prompts, sp, key=0))
    ]
    times = {m: {"sft": [], "decode": []} for m in modes}
    for r in range(a.rounds):
        for m in modes if r % 2 == 0 else list(modes)[::-1]:
            t0 = time.perf_counter()
            for _ in range(a.steps):
                loss = steps[m](tokens)
            float(loss)
            times[m]["sft"].append((time.perf_counter() - t0) / a.steps)
            t0 = time.perf_counter()
            engines[m].generate(prompts, sp, key=0)
            times[m]["decode"].append(time.perf_counter() - t0)
    ntok = a.prompts * a.new_tokens
    print(f"{'':10}{'compile SFT s':>14}{'compile engine s':>17}{'SFT step ms':>13}{'decode tok/s':>14}")
    for m in modes:
        print(
            f"{m:10}{compile_s[m][0]:14.1f}{compile_s[m][1]:17.1f}{1e3 * statistics.median(times[m]['sft']):13.1f}"
            f"{ntok / statistics.median(times[m]['decode']):14.0f}"
        )
    for k in ("sft", "decode"):
        ratios = [s / u for s, u in zip(times["scan"][k], times["unrolled"][k])]
        print(
            f"time scan / unrolled, {k}: {statistics.median(ratios):.3f} (median of {a.rounds} paired rounds; "
            f"range {min(ratios):.3f}-{max(ratios):.3f})"
        )
    print(f"greedy tokens equal, scan vs unrolled: {sum(same)} / {len(same)} prompts")


if __name__ == "__main__":
    main()
