"""MoE layer forward+backward time vs expert count at fixed activated parameters, per compute path.

  python experiments/bench/bench_moe.py [--tokens 2048] [--hidden 256] [--width 256] [--k 2]

Cost should scale with routed work, not with the number of experts: the dispatch path at 64 experts should stay
within 1.3x of its time at 8 experts, and beat the dense (every expert on every token) path by >= 20x at 64.
``dispatch_gather`` is the earlier dispatch variant (padded tiles + per-tile weight gather), kept for comparison in
moe_gather.py beside this script.
Prints a markdown table; all paths are timed in the same process, interleaved, median of repeats (wall clock; the
min over repeats is printed too, as the machine may be shared).  Each timed call is preceded by ``--gap`` seconds of
sleep: the dense / ragged paths at 64 experts free GB-sized buffers, and for ~0.1-0.3 s after they return the next
call runs up to 2.5x slower (measured: dispatch at 64 experts 143 ms right after a dense call, 64 ms after 0.3 s,
68 ms with no dense call in between), which would charge one path for another's teardown.
``--malloc_keep`` makes glibc keep freed memory in the process (mallopt): by default each call at 64 experts
page-faults ~15k fresh pages for its ~50 MB of weight gradients (same for every path), ~20% of dispatch's time here.
"""

import argparse
import ctypes
import time

import jax
import jax.numpy as jnp
import numpy as np
from moe_gather import moe_dispatch_gather  # this folder (the script's own, first on sys.path)

from ring_jax.model.moe import moe_dense, moe_dispatch, moe_ragged, route

PATHS = {"dispatch": moe_dispatch, "dispatch_gather": moe_dispatch_gather, "ragged": moe_ragged, "dense": moe_dense}


def make(fn, k):
    def loss(x, logits, wg, wu, wd):
        w, ids, _ = route(logits, k, True)
        return jnp.sum(fn(x, w, ids, wg, wu, wd) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--experts", default="8,16,32,64")
    ap.add_argument("--paths", default="dispatch,dispatch_gather,ragged,dense")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gap", type=float, default=0.3, help="seconds of sleep before each timed call")
    ap.add_argument("--malloc_keep", action="store_true", help="glibc keeps freed memory (no re-faulting)")
    a = ap.parse_args()
    if a.malloc_keep:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(a.tokens, a.hidden)), jnp.float32)
    rows = []
    for e in map(int, a.experts.split(",")):
        ws = [
            jnp.asarray(rng.normal(size=s) * 0.05, jnp.float32)
            for s in ((e, a.hidden, a.width), (e, a.hidden, a.width), (e, a.width, a.hidden))
        ]
        logits = jnp.asarray(rng.normal(size=(a.tokens, e)), jnp.float32)
        fns = {p: make(PATHS[p], a.k) for p in a.paths.split(",")}
        for f in fns.values():
            jax.block_until_ready(f(x, logits, *ws))  # compile
        times = {p: [] for p in fns}
        for _ in range(a.reps):
            for p, f in fns.items():
                time.sleep(a.gap)
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, logits, *ws))
                times[p].append(time.perf_counter() - t0)
        rows.append(
            (e, {p: float(np.median(t)) for p, t in times.items()}, {p: float(np.min(t)) for p, t in times.items()})
        )
    paths = a.paths.split(",")
    flops = 3 * 2 * 3 * a.tokens * a.k * a.hidden * a.width  # fwd+bwd of the three routed matmuls
    print(
        f"MoE layer fwd+bwd, {a.tokens} tokens, hidden {a.hidden}, expert width {a.width}, top-{a.k}, float32, "
        f"{jax.device_count()} x {jax.devices()[0].platform}"
    )
    print(
        "| experts | "
        + " | ".join(f"{p} ms" for p in paths)
        + " | dense / dispatch | dispatch GFLOP/s | dispatch min ms |"
    )
    print("|---" * (len(paths) + 4) + "|")
    for e, t, tmin in rows:
        cells = " | ".join(f"{t[p] * 1e3:.1f}" for p in paths)
        ratio = f"{t['dense'] / t['dispatch']:.1f}x" if "dense" in t and "dispatch" in t else "-"
        gf = f"{flops / t['dispatch'] / 1e9:.1f}" if "dispatch" in t else "-"
        mn = f"{tmin['dispatch'] * 1e3:.1f}" if "dispatch" in tmin else "-"
        print(f"| {e} | {cells} | {ratio} | {gf} | {mn} |")
    for p in ("dispatch", "dispatch_gather"):
        if p in rows[0][1]:
            lo, hi = rows[0], rows[-1]
            print(
                f"{p} time at {hi[0]} experts / at {lo[0]}: {hi[1][p] / lo[1][p]:.2f}x median, "
                f"{hi[2][p] / lo[2][p]:.2f}x min"
            )


if __name__ == "__main__":
    main()
