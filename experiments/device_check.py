"""One short check of the accelerator paths (run by experiments/device_check.sh; budget: under 8 minutes on one GPU).

1. Every Pallas kernel compiled for real (interpret=False) against its plain-jnp reference: top-k routing, expert
   metadata, grouped matmul (forward and both gradients through the MoE FFN), permute / combine, and the decode
   attention.  Max abs error and pass / fail against a stated tolerance.
2. The SFT train step of the small preset at bf16 compute over f32 master weights (8 x 1024 tokens): median step
   time, tokens/s and MFU against the chip's dense bf16 peak (--peak_tflops; the H200 SXM's 989) and against a
   measured bf16 4096^3 matmul.
3. The sampling engine on the small preset: greedy decode tokens/s at 64 and 256 slots, 32-token prompts x 256 new
   tokens, the blocked XLA cache attention against the Pallas decode kernel.

Prints one table (a line per check) and exits non-zero when a kernel check fails.  On a CPU it runs in interpret mode
with smaller shapes (a smoke test of the script itself: ``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROWS: list[tuple[str, str, str]] = []  # (check, result, verdict)


def row(name, result, ok=None):
    ROWS.append((name, result, "" if ok is None else ("ok" if ok else "FAIL")))
    print(f"  {name}: {result} {'' if ok is None else ('ok' if ok else 'FAIL')}", flush=True)


def err(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def kernels_check(interpret: bool, small: bool):
    from ring_kernels.combine import permute, permute_ref, unpermute_combine, unpermute_combine_ref
    from ring_kernels.decode_attention import decode_attention, decode_attention_ref
    from ring_kernels.ops import moe_ffn, moe_ffn_ref
    from ring_kernels.routing import expert_metadata, expert_metadata_ref, topk_route, topk_route_ref

    rng = np.random.default_rng(0)
    t, h, f, e, k = (64, 64, 32, 8, 2) if small else (2048, 2048, 1408, 64, 6)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    w, ids = topk_route(logits, k, True, interpret=interpret)
    w0, ids0 = topk_route_ref(logits, k, True)
    row("routing top-k ids equal", f"{int(jnp.sum(ids != ids0))} differ of {ids.size}", bool(jnp.all(ids == ids0)))
    row("routing weights", f"max err {err(w, w0):.1e}", err(w, w0) < 1e-5)
    meta, meta0 = expert_metadata(ids, e, interpret=interpret), expert_metadata_ref(ids, e)
    same = all(bool(jnp.all(a == b)) for a, b in zip(meta, meta0))
    row("expert metadata equal", str(same), same)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.bfloat16)
    xs, xs0 = permute(x, meta, k, interpret=interpret), permute_ref(x, meta, k)
    row("permute", f"max err {err(xs, xs0):.1e}", err(xs, xs0) == 0.0)
    y = jnp.asarray(rng.standard_normal((t * k, h)), jnp.bfloat16)
    c, c0 = unpermute_combine(y, meta, w, interpret=interpret), unpermute_combine_ref(y, meta, w)
    row("combine (bf16, f32 accumulation)", f"max err {err(c, c0):.1e}", err(c, c0) < 2e-2)
    wg, wu = (jnp.asarray(rng.standard_normal((e, h, f)) / np.sqrt(h), jnp.bfloat16) for _ in range(2))
    wd = jnp.asarray(rng.standard_normal((e, f, h)) / np.sqrt(f), jnp.bfloat16)
    loss = lambda fn: lambda *a: jnp.sum(fn(a[0], ids, w, *a[1:]).astype(jnp.float32) ** 2)  # noqa: E731
    out = jax.jit(lambda *a: moe_ffn(*a[:1], ids, w, *a[1:], interpret=interpret))(x, wg, wu, wd)
    out0 = moe_ffn_ref(x, ids, w, wg, wu, wd)
    scale = float(jnp.max(jnp.abs(out0.astype(jnp.float32))))
    row("MoE FFN forward (gmm x 3)", f"max err {err(out, out0) / scale:.1e} of max", err(out, out0) < 2e-2 * scale)
    g = jax.jit(jax.grad(loss(lambda *a: moe_ffn(*a, interpret=interpret)), argnums=(0, 1, 3)))(x, wg, wu, wd)
    g0 = jax.jit(jax.grad(loss(moe_ffn_ref), argnums=(0, 1, 3)))(x, wg, wu, wd)
    rel = max(err(a, b) / max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))), 1e-30) for a, b in zip(g, g0))
    row("MoE FFN gradients (gmm d_lhs, tgmm)", f"max rel err {rel:.1e}", rel < 3e-2)
    nl, b, kvh, gq, d, s = (2, 4, 2, 4, 16, 512) if small else (4, 64, 4, 4, 128, 16384)
    kc = jnp.asarray(rng.standard_normal((nl, b, kvh, d, s)), jnp.bfloat16)
    vc = jnp.asarray(rng.standard_normal((nl, b, kvh, s, d)), jnp.bfloat16)
    lens = rng.integers(1, s + 1, b)
    kseg = jnp.asarray((np.arange(s)[None] < lens[:, None]).astype(np.int32))
    kpos = jnp.asarray(np.broadcast_to(np.arange(s), (b, s)).astype(np.int32))
    q = jnp.asarray(rng.standard_normal((b, kvh * gq, d)), jnp.bfloat16)
    qs, qp = jnp.ones((b,), jnp.int32), jnp.asarray(lens - 1, jnp.int32)
    da = jax.jit(lambda *a: decode_attention(*a, interpret=interpret))(
        q, kc, vc, jnp.int32(1), qs, qp, kseg, kpos, jnp.asarray(lens, jnp.int32)
    )
    da0 = decode_attention_ref(q, kc, vc, 1, qs, qp, kseg, kpos)
    row("decode attention (bf16 cache, per-row lengths)", f"max err {err(da, da0):.1e}", err(da, da0) < 3e-2)


def train_check(peak_tflops: float, small: bool):
    from ring_jax.config import get_preset
    from ring_jax.train.metrics import flops_per_token, measure_matmul_peak

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench"))
    from train_adapter import bench_adapter  # experiments/bench/train_adapter.py

    b, t = (2, 128) if small else (8, 1024)
    cfg = get_preset("small", dtype="bfloat16", param_dtype="float32", max_position_embeddings=max(1024, t))
    run = bench_adapter(cfg)
    tokens = np.random.default_rng(0).integers(2, cfg.vocab_size, (b, t))
    t0 = time.perf_counter()
    float(run(tokens))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(5 if small else 20):
        t0 = time.perf_counter()
        float(run(tokens))
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tps = b * t / step
    fpt = flops_per_token(cfg, t)
    measured = measure_matmul_peak("bfloat16", n=1024 if small else 4096)
    row("SFT step small bf16/f32", f"{b}x{t}: {1e3 * step:.1f} ms, {tps:,.0f} tok/s, compile {compile_s:.0f} s")
    row(
        "SFT step MFU",
        f"{100 * tps * fpt / (peak_tflops * 1e12):.1f}% of {peak_tflops:g} TFLOP/s, "
        f"{100 * tps * fpt / measured:.1f}% of the measured bf16 matmul ({measured / 1e12:.0f} TFLOP/s)",
    )


def engine_check(small: bool):
    from flax import nnx

    from ring_jax.config import get_preset
    from ring_jax.model import build_model
    from ring_jax.sampling.engine import SamplingEngine
    from ring_jax.sampling.types import SamplingParams

    new = 32 if small else 256
    for slots in (8,) if small else (64, 256):
        for mode in ("blocked", "pallas"):
            cfg = get_preset("small", dtype="bfloat16", cache_attn=mode)
            model = build_model(cfg, 0)
            eng = SamplingEngine(*nnx.split(model), num_slots=slots, chunk=32)
            prompts = [list(np.random.default_rng(i).integers(2, cfg.vocab_size, 32)) for i in range(slots)]
            sp = SamplingParams(temperature=0.0, max_new_tokens=new, ignore_eos=True)
            eng.generate(prompts, sp, key=0)
            best = 0.0
            for _ in range(3):
                eng.generate(prompts, sp, key=0)
                st = eng.last_stats
                best = max(best, st["generated_tokens"] / st["decode_seconds"])
            row(f"engine decode {slots} slots, {mode}", f"{best:,.0f} tok/s (32-token prompts, {new} new, greedy)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak_tflops", type=float, default=989.0, help="the chip's dense bf16 peak (H200 SXM: 989)")
    ap.add_argument("--smoke", action="store_true", help="small shapes, interpret mode off-accelerator")
    ap.add_argument("--only", default="kernels,train,engine")
    a = ap.parse_args()
    platform = jax.devices()[0].platform
    interpret = platform == "cpu"
    small = a.smoke or interpret
    print(
        f"device check: jax {jax.__version__}, {jax.devices()[0].device_kind} ({platform}), "
        f"{'interpret mode, small shapes' if interpret else 'compiled'}",
        flush=True,
    )
    t0 = time.time()
    for name, fn in (
        ("kernels", lambda: kernels_check(interpret, small)),
        ("train", lambda: train_check(a.peak_tflops, small)),
        ("engine", lambda: engine_check(small)),
    ):
        if name in a.only.split(","):
            try:
                fn()
            except Exception as e:  # one failing part must not hide the others
                row(name, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", False)
    w = max(len(r[0]) for r in ROWS)
    print(f"\n{'check':<{w}}  result")
    for name, result, verdict in ROWS:
        print(f"{name:<{w}}  {result}  {verdict}")
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(1 if any(v == "FAIL" for _, _, v in ROWS) else 0)


if __name__ == "__main__":
    main()
