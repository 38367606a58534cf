"""Grouped-matmul micro-benchmark: Pallas gmm vs lax.ragged_dot vs a dense einsum, on the current backend.

    python experiments/bench/bench_gmm.py                       # Ring-lite-like layer shape on GPU/TPU, tiny on CPU
    python experiments/bench/bench_gmm.py --tokens 4096 --experts 64 --k 6 --hidden 2048 --ffn 1408 --tiling 128,64,128
    python experiments/bench/bench_gmm.py --bwd                 # also time forward+backward (d_lhs, d_rhs)

The rows are T*k token copies grouped by expert (group sizes from a random top-k routing, so some imbalance).
"dense" is the capacity-free dense alternative: every expert on every row (einsum over E, E times the work), then
the routed row picked -- a roofline foil for small E, not a candidate for E=64.  Useful FLOPs = 2*M*K*N for all
three (the dense path's wasted work is not counted), so its TFLOP/s reads as "effective".
On CPU the Pallas kernel runs in interpret mode: a smoke run only, the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# ring_kernels from this checkout's kernels/ folder, installed or not
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "kernels")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ring_kernels.gmm import GmmTiling, gmm  # noqa: E402


def _time(fn, *args, iters: int):
    out = fn(*args)
    jax.block_until_ready(out)  # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters, out


def main(argv=None):
    cpu = jax.default_backend() == "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64 if cpu else 4096)
    p.add_argument("--experts", type=int, default=8 if cpu else 64)
    p.add_argument("--k", type=int, default=2 if cpu else 6)
    p.add_argument("--hidden", type=int, default=64 if cpu else 2048)
    p.add_argument("--ffn", type=int, default=32 if cpu else 1408)
    p.add_argument("--dtype", default="float32" if cpu else "bfloat16")
    p.add_argument("--tiling", default="32,32,32" if cpu else "128,128,128", help="tm,tk,tn for every pass")
    p.add_argument("--iters", type=int, default=2 if cpu else 20)
    p.add_argument("--bwd", action="store_true", help="time forward+backward instead of forward only")
    p.add_argument("--no-dense", action="store_true")
    a = p.parse_args(argv)

    t, e, k, h, f = a.tokens, a.experts, a.k, a.hidden, a.ffn
    dt = jnp.dtype(a.dtype)
    tile = tuple(int(v) for v in a.tiling.split(","))
    tiling = GmmTiling(tile, tile, tile)
    m = t * k
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    ids = jnp.argsort(jax.random.gumbel(k1, (t, e)) + jnp.linspace(0, 1, e), axis=1)[:, :k]  # mild imbalance
    sizes = jnp.bincount(ids.reshape(-1), length=e).astype(jnp.int32)
    lhs = jax.random.normal(k2, (m, h), jnp.float32).astype(dt)
    rhs = (jax.random.normal(k3, (e, h, f), jnp.float32) / np.sqrt(h)).astype(dt)
    offs = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)])
    row_expert = jnp.searchsorted(offs[1:], jnp.arange(m), side="right")

    def pallas(x, w):
        return gmm(x, w, sizes, tiling=tiling, preferred_element_type=jnp.float32)

    def ragged(x, w):
        return jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)

    def dense(x, w):
        y = jnp.einsum("mh,ehf->mef", x, w, preferred_element_type=jnp.float32)
        return jnp.take_along_axis(y, row_expert[:, None, None], axis=1)[:, 0]

    impls = {"pallas_gmm": pallas, "ragged_dot": ragged}
    if not a.no_dense:
        impls["dense_einsum"] = dense
    flops = 2.0 * m * h * f * (3.0 if a.bwd else 1.0)
    print(
        f"backend={jax.default_backend()} ({jax.devices()[0].device_kind}) T={t} k={k} E={e} H={h} F={f} "
        f"M={m} dtype={dt.name} tiling={tile} {'fwd+bwd' if a.bwd else 'fwd'}"
        f" group sizes min/max={int(sizes.min())}/{int(sizes.max())}"
    )
    results = {}
    for name, fn in impls.items():
        if a.bwd:
            cot = jnp.ones((m, f), jnp.float32)
            run = jax.jit(lambda x, w, fn=fn: jax.vjp(fn, x, w)[1](cot))  # noqa: B023 (called in this iteration)
        else:
            run = jax.jit(fn)
        try:
            sec, out = _time(run, lhs, rhs, iters=a.iters)
        except Exception as exc:  # keep going: the point is a comparison on whatever works
            print(f"{name:>13}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        results[name] = out
        print(f"{name:>13}: {sec * 1e3:9.3f} ms  {t / sec:12.0f} tokens/s  {flops / sec / 1e12:8.3f} TFLOP/s")
    if "pallas_gmm" in results and "ragged_dot" in results:
        pa = jax.tree.leaves(results["pallas_gmm"])
        rg = jax.tree.leaves(results["ragged_dot"])
        err = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))) for x, y in zip(pa, rg))
        scale = max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))) for y in rg)
        print(f"max |pallas - ragged_dot| = {err:.3e} (max |ragged_dot| = {scale:.3e})")


if __name__ == "__main__":
    main()
