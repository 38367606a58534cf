"""Decode throughput against the batch size (issue 15): ring_jax's engine, transformers and Tunix side by side at
16 / 64 / 128 / 256 rows, each ring_jax figure as a fraction of the machine's limit, a profile of the decode step,
and the RL step at the main job's shape.

    python experiments/bench/bench_decode_scaling.py                          # ring_jax: limits, engine, profile
    python experiments/bench/bench_decode_scaling.py --torch_python /work/refvenv/bin/python \\
        --tunix_python /work/tunixvenv/bin/python                               # + both peers at every batch size
    python experiments/bench/bench_decode_scaling.py --baseline_root /tmp/old    # + an older checkout's engine

Workload (bench_sampling.py's): the benchmark MoE (4 layers, hidden 256, 8 / 2 heads, 8 experts top-2 of width 256
+ 1 shared, vocab 1024, float32, random weights), random prompts of 32 tokens, 128 new tokens, greedy (every row runs
to 128 tokens), cache 160.  Sections (``--sections``):

  limits   the f32 matmul peak (2048^3, best of 5) and the read bandwidth (a jitted sum over 256 MB, best of 5),
           measured in this run; the limit of one decode step at B rows is max(weight bytes / bandwidth,
           FLOPs(B) / peak) (issue 15's definition: every weight read once; 2 x active parameters x B FLOPs plus
           attention over the live cache).  A second limit adds the KV cache each step reads (every layer's K and
           V over the cache length) to the bytes: at 256 rows that is more than the weights.
  engine   ring_jax tok/s (prefill + decode, best of --repeats after a compiling call) and ms per decode step (the
           decode calls only), greedy; then the same at temperature 1 (the RL rollout's setting) and at top-p 0.95
  profile  the decode step with one part removed at a time (the MoE's router and routed experts, attention over
           the cache, sampling, the lm_head): each part's cost is the step time minus the step time without it
  torch    transformers ``generate`` (Qwen2-MoE of the same sizes, bench_sampling's script) at every batch size
  tunix    Tunix's Sampler (peers/tunix_sampler.py, Qwen3-MoE of the same sizes without the shared expert) at every
           batch size, with ring_jax timed on that same no-shared-expert model just before it
  rl       bench_rl.py at the main job's shape: 16 prompts x 8 samples x <= 128 new tokens, c3po, 3 steps
  baseline with --baseline_root (a checkout of an older commit): its engine on the same workload, interleaved
           with this one, as a ratio

Prints one table per section and a last line ``RESULTS {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from bench_sampling import SIZES, TORCH_SCRIPT, TUNIX_PEER, bench_config, run_peer  # noqa: E402

ENGINE_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/experiments/bench")
import numpy as np
from bench_sampling import bench_config
from ring_jax.model import build_model
from ring_jax.sampling import SamplingEngine, SamplingParams
a = json.loads(sys.argv[2])
model = build_model(bench_config(shared_experts=a["shared"]), seed=0)
prompts = np.random.default_rng(0).integers(3, 1024, (a["rows"], a["prompt"])).tolist()
sp = SamplingParams(temperature=a["temperature"], top_p=a["top_p"], max_new_tokens=a["new"], ignore_eos=True)
eng = SamplingEngine.from_model(model, num_slots=a["rows"], chunk=a["chunk"], cache_len=a["prompt"] + a["new"])
eng.generate(prompts, sp, key=0)
best = None
for _ in range(a["repeats"]):
    t, c = time.perf_counter(), time.process_time()
    out = eng.generate(prompts, sp, key=0)
    dt = time.perf_counter() - t
    if best is None or dt < best["seconds"]:
        st = eng.last_stats
        best = dict(seconds=dt, cpu_s=time.process_time() - c, decode_seconds=st.get("decode_seconds", float("nan")),
                    decode_steps=st["decode_steps"], tokens=sum(len(o.token_ids) for o in out))
print("RESULT " + json.dumps(best))
"""


def parse_rows(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# ------------------------------------------------------------------------------------------------ machine limits
def read_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """Bytes/s of a jitted float32 sum over an ``mb`` MB array (beyond the caches), best of ``reps``."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mb * 2**20 // 4096, 1024), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(x))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def model_figures(cfg, rows: int, cache_len: int, live: float) -> dict:
    """Bytes and FLOPs of one decode step at ``rows`` rows: every weight (bytes of all parameters), 2 x active
    parameters (embedding lookup excluded, lm_head included) per row, attention over ``live`` cache slots per row,
    and the KV cache read (every layer's K and V over the cache length)."""
    import numpy as np
    from flax import nnx

    from ring_jax.model import abstract_model

    state = nnx.state(abstract_model(cfg), nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(state))
    h, f, e, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
    nh, kvh, d, L, v = (cfg.num_attention_heads, cfg.kv_heads, cfg.head_size, cfg.num_hidden_layers, cfg.vocab_size)
    attn = h * nh * d * 2 + h * kvh * d * 2
    moe = h * e + k * 3 * h * f + (cfg.num_shared_experts or 0) * 3 * h * f
    active = L * (attn + moe) + h * v
    flops = rows * (2 * active + L * 2 * 2 * nh * d * live)
    kv_bytes = rows * L * 2 * kvh * cache_len * d * 4
    return dict(weight_bytes=total * 4, flops=flops, kv_bytes=kv_bytes, params=total, active=active)


# ------------------------------------------------------------------------------------------------ ring_jax engine
def time_engine(model, rows, prompts, params, repeats, chunk, cache_len):
    """(best wall s, that call's stats with cpu_s) after a compiling call."""
    from ring_jax.sampling import SamplingEngine

    eng = SamplingEngine.from_model(model, num_slots=rows, chunk=chunk, cache_len=cache_len)
    eng.generate(prompts, params, key=0)
    best, stats = float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        eng.generate(prompts, params, key=0)
        dt = time.perf_counter() - t
        if dt < best:
            best, stats = dt, dict(eng.last_stats, cpu_s=time.process_time() - c)
    return best, stats, eng


PARTS = ("moe", "attention", "sampling", "lm_head")


def ablated(part: str):
    """Context manager: the decode step without ``part`` (shapes kept, so the rest of the step is unchanged)."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from ring_jax.model import attention, moe
    from ring_jax.sampling import device, rules

    patches = {
        "moe": (
            moe.MoEBlock,
            "_routed",
            lambda self, flat, *a: (jnp.zeros(flat.shape, jnp.float32), jnp.zeros((), jnp.int32)),
        ),
        "attention": (attention, "dot_attention_heads_major", lambda q, kt, vt, mask: q),
        "sampling": (
            rules,
            "sample_tokens",
            lambda logits, keys, *a, **k: (jnp.zeros(logits.shape[:1], jnp.int32) + 3, logits[:, 0], logits[:, 1]),
        ),
        "lm_head": (device, "project", lambda h, w: jnp.zeros((h.shape[0], w.shape[1]), jnp.float32) + h[:, :1]),
    }

    @contextlib.contextmanager
    def cm():
        obj, name, fn = patches[part]
        old = getattr(obj, name)
        setattr(obj, name, fn)
        jax.clear_caches()
        try:
            yield
        finally:
            setattr(obj, name, old)
            jax.clear_caches()

    return cm()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="limits,engine,profile,torch,tunix,rl,baseline")
    ap.add_argument("--rows", default="16,64,128,256")
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--torch_python", default=None)
    ap.add_argument("--tunix_python", default=None)
    ap.add_argument("--baseline_root", default=None, help="a checkout of an older commit: its engine, side by side")
    ap.add_argument("--rl_steps", type=int, default=3)
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    rows_list = parse_rows(args.rows)

    import jax
    import numpy as np

    from ring_jax.model import build_model
    from ring_jax.sampling import SamplingParams
    from ring_jax.train.metrics import measure_matmul_peak

    cache_len = args.prompt_len + args.new_tokens
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}); sizes {SIZES}; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"cache {cache_len}, float32, rows {rows_list}",
        flush=True,
    )
    cfg = bench_config()
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = {r: rng.integers(3, cfg.vocab_size, (r, args.prompt_len)).tolist() for r in rows_list}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    results: dict = {"rows": rows_list}

    peak = bw = None
    if "limits" in sections:
        peak = measure_matmul_peak("float32", 2048, 5)
        bw = read_bandwidth()
        results.update(matmul_peak_gflops=peak / 1e9, read_gb_s=bw / 1e9)
        print(
            f"\n[limits] matmul peak {peak / 1e9:.0f} GFLOP/s (f32 2048^3), read bandwidth {bw / 1e9:.1f} GB/s "
            f"(sum over 256 MB)"
        )
        print("| rows | weights MB | KV read MB | GFLOP | limit ms (weights, FLOPs) | limit ms incl. KV read |")
        print("|---|---|---|---|---|---|")
        for r in rows_list:
            m = model_figures(cfg, r, cache_len, live=args.prompt_len + args.new_tokens / 2)
            lim = max(m["weight_bytes"] / bw, m["flops"] / peak)
            lim_kv = max((m["weight_bytes"] + m["kv_bytes"]) / bw, m["flops"] / peak)
            results[f"limit_ms_{r}"], results[f"limit_kv_ms_{r}"] = lim * 1e3, lim_kv * 1e3
            print(
                f"| {r} | {m['weight_bytes'] / 1e6:.1f} | {m['kv_bytes'] / 1e6:.1f} | {m['flops'] / 1e9:.3f} | "
                f"{lim * 1e3:.2f} | {lim_kv * 1e3:.2f} |"
            )

    peer_rows: dict = {}
    if "engine" in sections or "torch" in sections or "tunix" in sections:
        print("\n[engine] greedy, side by side per batch size (ring_jax, then transformers, then Tunix)", flush=True)
        print(
            "| rows | ring_jax tok/s | ms/decode step | of limit | of limit incl. KV | transformers tok/s | "
            "ring_jax / HF | ring_jax (no shared expert) tok/s | Tunix tok/s | ring_jax / Tunix |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_list:
        if not sections & {"engine", "torch", "tunix"}:
            break
        ntok = r * args.new_tokens
        line = dict(rows=r)
        if "engine" in sections:
            t, st, eng = time_engine(model, r, prompts[r], greedy, args.repeats, args.chunk, cache_len)
            ms = st["decode_seconds"] / st["decode_steps"] * 1e3
            line.update(tok_s=ntok / t, ms_step=ms, decode_moe=eng.decode_moe_impl)
            if f"limit_ms_{r}" in results:
                line.update(frac=results[f"limit_ms_{r}"] / ms, frac_kv=results[f"limit_kv_ms_{r}"] / ms)
        if "torch" in sections and args.torch_python:
            a = dict(
                SIZES,
                batch=r,
                prompt=args.prompt_len,
                new=args.new_tokens,
                repeats=max(1, args.repeats - 1),
                threads=args.threads,
            )
            p = subprocess.run(
                [args.torch_python, "-c", TORCH_SCRIPT, json.dumps(a)],
                capture_output=True,
                text=True,
                env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
            )
            got = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if got:
                line["hf_tok_s"] = json.loads(got[0][7:])["tokens_per_s"]
            else:
                line["hf_error"] = (p.stderr.strip().splitlines() or ["no output"])[-1]
        if "tunix" in sections and args.tunix_python:
            t, st, _ = time_engine(
                build_model(bench_config(shared_experts=0), seed=0),
                r,
                prompts[r],
                greedy,
                args.repeats,
                args.chunk,
                cache_len,
            )
            line["noshared_tok_s"] = ntok / t
            a = dict(SIZES, batch=r, prompt=args.prompt_len, new=args.new_tokens, repeats=max(1, args.repeats - 1))
            tr, why = run_peer(args.tunix_python, TUNIX_PEER, a)
            if tr is None:
                line["tunix_error"] = why
            else:
                line["tunix_tok_s"] = tr["tokens_per_s"]
        peer_rows[r] = line

        def f(key, fmt="{:,.0f}"):
            return fmt.format(line[key]) if key in line else "-"  # noqa: B023 (called in this iteration)

        hf_ratio = f"{line['tok_s'] / line['hf_tok_s']:.2f}x" if "tok_s" in line and "hf_tok_s" in line else "-"
        tx_ratio = (
            f"{line['noshared_tok_s'] / line['tunix_tok_s']:.2f}x"
            if "noshared_tok_s" in line and "tunix_tok_s" in line
            else "-"
        )
        print(
            f"| {r} | {f('tok_s')} | {f('ms_step', '{:.2f}')} ({line.get('decode_moe', '-')}) | "
            f"{f('frac', '{:.0%}')} | {f('frac_kv', '{:.0%}')} | {f('hf_tok_s')} | {hf_ratio} | "
            f"{f('noshared_tok_s')} | {f('tunix_tok_s')} | {tx_ratio} |",
            flush=True,
        )
        for k in ("hf_error", "tunix_error"):
            if k in line:
                print(f"  ({k}: {line[k]})")
    results["engine"] = peer_rows
    if "engine" in sections and len(rows_list) > 1 and all("tok_s" in peer_rows[r] for r in rows_list):
        lo, hi = rows_list[0], rows_list[-1]
        results["scaling"] = peer_rows[hi]["tok_s"] / peer_rows[lo]["tok_s"]
        print(f"[engine] tok/s at {hi} rows / at {lo} rows = {results['scaling']:.2f}x")

    if "engine" in sections:
        print(
            "\n[engine] sampled rows: temperature 1 (RL rollouts), and temperature 1 with top-p 0.95 (Ring-lite's "
            "evaluation)"
        )
        print("| rows | T=1 tok/s | T=1 ms/step | T=1, top-p 0.95 tok/s | ms/step |")
        print("|---|---|---|---|---|")
        for r in rows_list:
            out = []
            for sp in (
                SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, ignore_eos=True),
                SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.new_tokens, ignore_eos=True),
            ):
                t, st, _ = time_engine(model, r, prompts[r], sp, args.repeats, args.chunk, cache_len)
                out.append((r * args.new_tokens / t, st["decode_seconds"] / st["decode_steps"] * 1e3))
            results[f"t1_tok_s_{r}"], results[f"topp_tok_s_{r}"] = out[0][0], out[1][0]
            print(f"| {r} | {out[0][0]:,.0f} | {out[0][1]:.2f} | {out[1][0]:,.0f} | {out[1][1]:.2f} |", flush=True)

    if "profile" in sections:
        print("\n[profile] decode step (greedy) with one part removed; part = full step - step without it (ms)")
        print("| rows | full step | " + " | ".join(PARTS) + " | rest |")
        print("|---|---|" + "---|" * (len(PARTS) + 1))
        for r in rows_list:

            def step_ms():
                _, st, _ = time_engine(model, r, prompts[r], greedy, args.repeats, args.chunk, cache_len)  # noqa: B023 (called in this iteration)
                return st["decode_seconds"] / st["decode_steps"] * 1e3

            full = step_ms()
            parts = {}
            for part in PARTS:
                with ablated(part):
                    parts[part] = full - step_ms()
            results[f"profile_{r}"] = dict(full=full, **parts)
            rest = full - sum(parts.values())
            print(
                f"| {r} | {full:.2f} | "
                + " | ".join(f"{parts[p]:.2f} ({parts[p] / full:.0%})" for p in PARTS)
                + f" | {rest:.2f} |",
                flush=True,
            )

    if "baseline" in sections and args.baseline_root:
        print(f"\n[baseline] this engine vs {args.baseline_root}, greedy and T=1, interleaved (subprocesses)")
        print("| rows | sampling | baseline tok/s | this tok/s | speed-up |")
        print("|---|---|---|---|---|")
        for r in rows_list:
            for temp in (0.0, 1.0):
                a = dict(
                    rows=r,
                    prompt=args.prompt_len,
                    new=args.new_tokens,
                    chunk=args.chunk,
                    repeats=args.repeats,
                    temperature=temp,
                    top_p=1.0,
                    shared=1,
                )
                got = {}
                for name, root in (("baseline", args.baseline_root), ("this", ROOT)):
                    p = subprocess.run(
                        [sys.executable, "-c", ENGINE_SCRIPT, root, json.dumps(a)], capture_output=True, text=True
                    )
                    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                    got[name] = json.loads(line[0][7:]) if line else None
                if got["baseline"] and got["this"]:
                    tb = r * args.new_tokens / got["baseline"]["seconds"]
                    tt = r * args.new_tokens / got["this"]["seconds"]
                    results[f"baseline_speedup_{r}_{'greedy' if temp == 0 else 't1'}"] = tt / tb
                    print(
                        f"| {r} | {'greedy' if temp == 0 else 'T=1'} | {tb:,.0f} | {tt:,.0f} | {tt / tb:.2f}x |",
                        flush=True,
                    )
                else:
                    print(f"| {r} | T={temp} | failed | | |")

    if "rl" in sections:
        cmd = [
            sys.executable,
            os.path.join(HERE, "bench_rl.py"),
            "--aggregations",
            "c3po",
            "--prompts_per_step",
            "16",
            "--samples_per_prompt",
            "8",
            "--max_new_tokens",
            "128",
            "--seq_len",
            "192",
            "--responses_per_step",
            "64",
            "--steps",
            str(args.rl_steps),
        ]
        print(f"\n[rl] main job's shape: {' '.join(cmd[1:])}", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True)
        tail = [x for x in p.stdout.splitlines() if x.startswith("|") or x.startswith("RESULTS")]
        print("\n".join(tail[:-1]) if tail else f"[rl] failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        if tail and tail[-1].startswith("RESULTS"):
            results["rl"] = json.loads(tail[-1][len("RESULTS ") :]).get("c3po")

    print("RESULTS " + json.dumps(results, default=float))


if __name__ == "__main__":
    main()
