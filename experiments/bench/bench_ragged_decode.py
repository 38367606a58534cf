"""Decode cost against the cache length (issue 17 item 2): the blocked cache attention (the default: an XLA loop over
the cache blocks up to the longest live row) against the full one (every cache slot at every step, the engine
before), side by side in one process, on the small preset (random weights, float32, max_position_embeddings raised
to 32768 so that long caches are allowed).

    python experiments/bench/bench_ragged_decode.py [--rows=16] [--repeats=3] [--sections=live,spread] \
        [--spread_modes=blocked]

Sections:
  live    160 live tokens per row (32-token prompts + 128 greedy new tokens, every row to the end) in a cache of
          256, 4,096 and 16,384 slots (the engine's ``cache_len``): decode tokens/s (decode calls only, best of
          --repeats after a compiling call) and the ratio to the 256-slot cache.  Target: 16,384 within 1.3x of 256.
  spread  a long-CoT-like pool: --spread_requests requests whose lengths are drawn log-uniformly in
          [--spread_min, --spread_max] new tokens (64-token prompts, continuous batching over --rows slots, cache
          bucket 16,384): generated tokens/s of the whole call, blocked against full.
"""

import argparse
import math

import jax
import numpy as np
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.model import build_model
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import SamplingParams


def engine_for(model, mode: str, rows: int, cache_len: int | None, block: int):
    graphdef, state = nnx.split(model)
    cfg = model.config.replace(cache_attn=mode, cache_block=block)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg)))
    return SamplingEngine(graphdef, state, num_slots=rows, chunk=32, cache_len=cache_len)


def timed(eng, prompts, sp, repeats):
    eng.generate(prompts, sp, key=0)  # compile
    best = None
    for _ in range(repeats):
        eng.generate(prompts, sp, key=0)
        st = eng.last_stats
        rate = st["generated_tokens"] / st["decode_seconds"]
        best = rate if best is None else max(best, rate)
    return best, eng.last_stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--sections", default="live,spread")
    ap.add_argument("--caches", default="256,4096,16384")
    ap.add_argument("--spread_requests", type=int, default=32)
    ap.add_argument("--spread_min", type=int, default=1024)
    ap.add_argument("--spread_max", type=int, default=8192)
    ap.add_argument("--spread_modes", default="blocked,full", help="full at 16,384 slots takes ~15 min on 2 cores")
    a = ap.parse_args()
    cfg = get_preset("small", max_position_embeddings=32768)
    model = build_model(cfg, 0)
    rng = np.random.default_rng(0)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.local_device_count()} device); small preset "
        f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}), float32, {a.rows} rows, cache block "
        f"{a.block}"
    )
    if "live" in a.sections:
        prompts = [list(rng.integers(2, cfg.vocab_size, 32)) for _ in range(a.rows)]
        sp = SamplingParams(temperature=0.0, max_new_tokens=128, ignore_eos=True)
        print(
            "\n160 live tokens per row: decode tokens/s (best of repeats), ratio to the 256-slot cache; admit s: "
            "prefill + insert of the 16 prompts (blocked run), outside the decode time"
        )
        print(f"{'cache slots':>12}{'blocked':>10}{'full':>10}{'blocked/256':>13}{'full/256':>10}{'admit s':>9}")
        base = {}
        for s in [int(x) for x in a.caches.split(",")]:
            row, admit = {}, 0.0
            for mode in ("blocked", "full"):
                row[mode], st = timed(engine_for(model, mode, a.rows, s, a.block), prompts, sp, a.repeats)
                base.setdefault(mode, row[mode])
                admit = st.get("admit_seconds", float("nan")) if mode == "blocked" else admit
            print(
                f"{s:>12}{row['blocked']:>10.0f}{row['full']:>10.0f}{base['blocked'] / row['blocked']:>12.2f}x"
                f"{base['full'] / row['full']:>9.2f}x{admit:>9.3f}"
            )
    if "spread" in a.sections:
        n = a.spread_requests
        lens = np.exp(rng.uniform(math.log(a.spread_min), math.log(a.spread_max), n)).astype(int)
        prompts = [list(rng.integers(2, cfg.vocab_size, 64)) for _ in range(n)]
        sps = [SamplingParams(temperature=1.0, max_new_tokens=int(x), ignore_eos=True) for x in lens]
        print(
            f"\nspread pool: {n} requests, new tokens {lens.min()}-{lens.max()} (median {int(np.median(lens))}, "
            f"total {lens.sum()}), T = 1, continuous batching over {a.rows} rows"
        )
        out = {}
        for mode in a.spread_modes.split(","):
            cache = min(2 ** math.ceil(math.log2(64 + a.spread_max)), cfg.max_position_embeddings)
            eng = engine_for(model, mode, a.rows, cache, a.block)
            eng.generate(
                prompts[: a.rows], SamplingParams(temperature=1.0, max_new_tokens=8, ignore_eos=True), key=0
            )  # compiles prefill, insert and decode at this cache length
            eng.generate(prompts, sps, key=1)
            st = eng.last_stats
            out[mode] = st["generated_tokens"] / st["seconds"]
            print(
                f"  {mode:8} {out[mode]:8.0f} generated tok/s over the call ({st['seconds']:.0f} s: decode "
                f"{st['decode_seconds']:.0f}, admit {st['admit_seconds']:.1f}; cache {st['cache_len']} slots, "
                f"{st['decode_steps']} decode steps)"
            )
        if len(out) == 2:
            print(f"  blocked / full: {out['blocked'] / out['full']:.2f}x")


if __name__ == "__main__":
    main()
