"""Sampling throughput of the ring_jax engine on a small MoE (CPU), against Hugging Face transformers ``generate``.

    python experiments/bench/bench_sampling.py                                   # ring_jax only
    python experiments/bench/bench_sampling.py --torch_python /work/refvenv/bin/python   # + transformers peer
    python experiments/bench/bench_sampling.py --tunix_python /work/tunixvenv/bin/python   # + Tunix's Sampler

Model (both sides): 4 layers, hidden 256, 8 heads / 2 KV heads (head_dim 32), 8 routed experts top-2 of width 256 plus
one shared expert of width 256, vocab 1024, float32, random weights.  The transformers side is a Qwen2-MoE of the same
sizes (it adds q/k/v biases and a scalar shared-expert gate), ``generate(do_sample=False,
min_new_tokens=max_new_tokens)`` so it never stops early.  Sections:
  main      engine tokens/s, batch 16, prompt 32, 128 new tokens, greedy (prefill + decode, after a warm-up call)
  loop      decode chunk length (1 = a Python loop over a one-step jitted call; k = lax.while_loop of k steps)
  moe       moe_impl for sampling: dispatch / dense / ragged, given explicitly (prefill and decode both); [main]
            leaves it to the engine (prefill: the configured dispatch; decode on CPU at this batch: dense)
  batching  length-skewed workload: continuous batching vs static batching (waves of the same slot count, and all
            requests in one batch)
  torch     transformers generate on the same shapes (needs --torch_python)
  tunix     Tunix's vanilla Sampler (peers/tunix_sampler.py, needs --tunix_python), greedy on a Tunix Qwen3-MoE of
            the same sizes without the shared expert (Qwen3 has none); ring_jax is timed again on that same
            no-shared-expert model right before it, and the ratio ring_jax / Tunix uses that figure
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TUNIX_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "tunix_sampler.py")

SIZES = dict(layers=4, hidden=256, heads=8, kv_heads=2, experts=8, top_k=2, expert_width=256, vocab=1024)

TORCH_SCRIPT = r"""
import json, sys, time
import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
a = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(a["threads"])
cfg = Qwen2MoeConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=3 * a["hidden"],
                     num_hidden_layers=a["layers"], num_attention_heads=a["heads"], num_key_value_heads=a["kv_heads"],
                     num_experts=a["experts"], num_experts_per_tok=a["top_k"], moe_intermediate_size=a["expert_width"],
                     shared_expert_intermediate_size=a["expert_width"], decoder_sparse_step=1, mlp_only_layers=[],
                     norm_topk_prob=True, max_position_embeddings=1024, pad_token_id=0, eos_token_id=1,
                     bos_token_id=2, use_cache=True, torch_dtype="float32")
model = Qwen2MoeForCausalLM(cfg).eval()
ids = torch.randint(3, a["vocab"], (a["batch"], a["prompt"]))
mask = torch.ones_like(ids)
def run(n):
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
run(4)
times, cpu = [], []
for _ in range(a["repeats"]):
    t, c = time.perf_counter(), time.process_time(); out = run(a["new"])
    times.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
assert out.shape == (a["batch"], a["prompt"] + a["new"]), out.shape
print("RESULT " + json.dumps({"seconds": min(times), "tokens_per_s": a["batch"] * a["new"] / min(times),
                              "cpu_s": cpu[times.index(min(times))],
                              "torch": torch.__version__, "attn": model.config._attn_implementation}))
"""


def run_peer(python, script, args: dict):
    """Run a peer script (``python script '<json args>'``) and parse its ``RESULT <json>`` line: (result, None), or
    (None, "(exit N): why") with why from its ``ERROR`` line or its last stderr line."""
    try:
        r = subprocess.run([python, script, json.dumps(args)], capture_output=True, text=True)
    except OSError as e:
        return None, f"(exit 127): {type(e).__name__}: {e}"
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        why = next((x[6:] for x in r.stdout.splitlines() if x.startswith("ERROR ")), None)
        return None, f"(exit {r.returncode}): " + (why or (r.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(line[0][len("RESULT ") :]), None


def bench_config(moe_impl="dispatch", shared_experts=1):
    from ring_jax.config import ModelConfig

    s = SIZES
    return ModelConfig(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=3 * s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["hidden"] // s["heads"],
        max_position_embeddings=1024,
        rope_theta=10000.0,
        num_experts=s["experts"],
        num_shared_experts=shared_experts or None,
        num_experts_per_tok=s["top_k"],
        moe_intermediate_size=s["expert_width"],
        first_k_dense_replace=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_range=0.02,
        moe_impl=moe_impl,
    )


def timed(engine, prompts, params, repeats, **kw):
    """Best wall time over ``repeats`` calls after a compiling call; stats carry the process CPU seconds of that
    call (``cpu_s``: less sensitive than wall time to other jobs on a shared machine)."""
    engine.generate(prompts, params, **kw)  # compile this shape bucket
    best, stats = float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = engine.generate(prompts, params, **kw)
        dt = time.perf_counter() - t
        if dt < best:
            best, stats = dt, dict(engine.last_stats, cpu_s=time.process_time() - c)
    return best, stats, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="main,loop,moe,batching,torch,tunix")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--chunks", default="1,4,16,64")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--requests", type=int, default=64, help="batching section: number of requests")
    ap.add_argument("--long_fraction", type=float, default=0.25, help="batching section: requests without stops")
    ap.add_argument("--torch_python", default=None, help="interpreter with torch + transformers (e.g. /work/refvenv)")
    ap.add_argument("--tunix_python", default=None, help="interpreter with google-tunix (runs the tunix section)")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to try (the best one is compared)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))

    import jax
    import numpy as np

    from ring_jax.model import build_model
    from ring_jax.sampling import SamplingEngine, SamplingParams
    from ring_jax.sampling.device import cache_bucket, prompt_bucket

    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}); sizes {SIZES}; batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, float32"
    )
    cfg = bench_config()
    model = build_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).tolist()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens, ignore_eos=True)
    ntok = args.batch * args.new_tokens
    cache_len = args.prompt_len + args.new_tokens
    results = {}

    def engine(**kw):
        kw.setdefault("num_slots", args.batch)
        kw.setdefault("chunk", args.chunk)
        kw.setdefault("cache_len", cache_len)
        return SamplingEngine.from_model(model, **kw)

    if "main" in sections:
        eng = engine()
        t, st, _ = timed(eng, prompts, greedy, args.repeats)
        results["ring_jax_tokens_per_s"] = ntok / t
        paths = f"MoE: prefill {eng.cfg.moe_impl}, decode {eng.decode_moe_impl}"
        print(
            f"[main] ring_jax engine ({paths}, chunk {args.chunk}, cache {cache_len}): {t:.2f}s -> "
            f"{ntok / t:.0f} tokens/s ({st['decode_calls']} decode calls, {st['cpu_s']:.2f} CPU-s)"
        )
        t, st, _ = timed(engine(cache_len=None), prompts, greedy, args.repeats)
        bucket = cache_bucket(prompt_bucket(args.prompt_len) + args.new_tokens)
        print(
            f"[main] same with the default power-of-two cache bucket ({bucket}): {t:.2f}s -> {ntok / t:.0f} "
            f"tokens/s ({st['cpu_s']:.2f} CPU-s)"
        )

    if "loop" in sections:
        for c in map(int, args.chunks.split(",")):
            t, st, _ = timed(engine(chunk=c), prompts, greedy, args.repeats)
            print(
                f"[loop] chunk {c:4d}: {t:.2f}s -> {ntok / t:.0f} tokens/s ({st['decode_calls']} jitted calls, "
                f"{st['cpu_s']:.2f} CPU-s)"
            )
            results[f"chunk_{c}_tokens_per_s"] = ntok / t

    if "moe" in sections:
        for impl in ("dispatch", "dense", "ragged"):
            t, st, out = timed(engine(moe_impl=impl), prompts, greedy, args.repeats)
            print(f"[moe] moe_impl={impl:8s}: {t:.2f}s -> {ntok / t:.0f} tokens/s ({st['cpu_s']:.2f} CPU-s)")
            results[f"moe_{impl}_tokens_per_s"] = ntok / t

    if "batching" in sections:
        # A fraction --long_fraction of the requests runs to max_new_tokens; the others may stop on any of 64 stop
        # tokens (near-uniform random model: ~6% per step, so they end after ~16 tokens).  Sampling keys are per
        # sequence, so every mode generates exactly the same tokens.
        n = args.requests
        reqs = rng.integers(3, cfg.vocab_size, (n, args.prompt_len)).tolist()
        stops = tuple(range(100, 164))
        long_ids = set(np.random.default_rng(1).permutation(n)[: round(args.long_fraction * n)].tolist())
        params = [
            SamplingParams(
                temperature=1.0,
                max_new_tokens=args.new_tokens,
                ignore_eos=True,
                stop_token_ids=() if i in long_ids else stops,
            )
            for i in range(n)
        ]
        eng = engine()
        best = {}
        for rep in range(args.repeats + 1):  # interleaved (the machine is shared); first round = compilation
            for mode in ("continuous", "static"):
                t, c = time.perf_counter(), time.process_time()
                out = eng.generate(reqs, params, mode=mode, key=1)
                dt = time.perf_counter() - t
                if rep and dt < best.get(mode, (float("inf"),))[0]:
                    best[mode] = (dt, dict(eng.last_stats, cpu_s=time.process_time() - c), out)
        (tc, sc, oc), (ts, ss, os_) = best["continuous"], best["static"]
        assert [c.token_ids.tolist() for c in oc] == [c.token_ids.tolist() for c in os_]
        gen = sc["generated_tokens"]
        lens = sorted(len(c.token_ids) for c in oc)
        print(
            f"[batching] {n} requests, {args.batch} slots, {gen} tokens generated (lengths min {lens[0]}, "
            f"median {lens[n // 2]}, max {lens[-1]}; {sum(c.finish_reason == 'stop' for c in oc)} stopped early)"
        )
        print(
            f"[batching] continuous: {tc:.2f}s -> {gen / tc:.0f} tokens/s ({sc['decode_steps']} steps, "
            f"{sc['decode_calls']} calls, {sc['prefill_calls']} prefills, {sc['cpu_s']:.2f} CPU-s)"
        )
        print(
            f"[batching] static waves of {args.batch}: {ts:.2f}s -> {gen / ts:.0f} tokens/s "
            f"({ss['decode_steps']} steps, {ss['cpu_s']:.2f} CPU-s); continuous / static = {ts / tc:.2f}x wall, "
            f"{ss['cpu_s'] / sc['cpu_s']:.2f}x CPU"
        )
        results["continuous_over_static"] = ts / tc
        ta, sa, _ = timed(
            engine(num_slots=n, prefill_batch=args.batch), reqs, params, args.repeats, mode="static", key=1
        )
        print(
            f"[batching] static, all {n} in one batch: {ta:.2f}s -> {gen / ta:.0f} tokens/s "
            f"({sa['decode_steps']} steps, {sa['cpu_s']:.2f} CPU-s); continuous / all-in-one = {ta / tc:.2f}x wall, "
            f"{sa['cpu_s'] / sc['cpu_s']:.2f}x CPU"
        )
        results["continuous_over_static_all"] = ta / tc

    if "torch" in sections:
        if not args.torch_python:
            print("[torch] skipped: pass --torch_python (an interpreter with torch and transformers)")
        else:
            best = None
            for threads in map(int, args.threads.split(",")):
                a = dict(
                    SIZES,
                    batch=args.batch,
                    prompt=args.prompt_len,
                    new=args.new_tokens,
                    repeats=args.repeats,
                    threads=threads,
                )
                r = subprocess.run(
                    [args.torch_python, "-c", TORCH_SCRIPT, json.dumps(a)], capture_output=True, text=True
                )
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if r.returncode or not line:
                    print(f"[torch] failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
                    continue
                tr = json.loads(line[0][7:])
                print(
                    f"[torch] transformers Qwen2-MoE generate (torch {tr['torch']}, {tr['attn']}, {threads} "
                    f"threads): {tr['seconds']:.2f}s -> {tr['tokens_per_s']:.0f} tokens/s ({tr['cpu_s']:.2f} CPU-s)"
                )
                if best is None or tr["tokens_per_s"] > best:
                    best = tr["tokens_per_s"]
            if best is not None:
                results["hf_tokens_per_s"] = best
                if "ring_jax_tokens_per_s" in results:
                    print(
                        f"[torch] ring_jax / transformers (its best thread count) = "
                        f"{results['ring_jax_tokens_per_s'] / best:.2f}x wall"
                    )
    if "tunix" in sections and args.tunix_python:
        # ring_jax on Tunix's model shape (no shared expert), then Tunix: side by side, so the ratio is fair
        t, st, _ = timed(
            SamplingEngine.from_model(
                build_model(bench_config(shared_experts=0), seed=0),
                num_slots=args.batch,
                chunk=args.chunk,
                cache_len=cache_len,
            ),
            prompts,
            greedy,
            args.repeats,
        )
        results["ring_jax_noshared_tokens_per_s"] = ntok / t
        results["ring_jax_noshared_cpu_s"] = st["cpu_s"]
        print(
            f"[tunix] ring_jax engine, same model without the shared expert: {t:.2f}s -> {ntok / t:.0f} tokens/s "
            f"({st['cpu_s']:.2f} CPU-s; load average {os.getloadavg()[0]:.1f})"
        )
        a = dict(SIZES, batch=args.batch, prompt=args.prompt_len, new=args.new_tokens, repeats=args.repeats)
        tr, why = run_peer(args.tunix_python, TUNIX_PEER, a)
        if tr is None:
            print(f"[tunix] failed {why}")
        else:
            results["tunix_tokens_per_s"] = tr["tokens_per_s"]
            results["tunix_cpu_s"] = tr["cpu_s"]
            print(
                f"[tunix] Tunix {tr['tunix']} vanilla Sampler, greedy (jax {tr['jax']}, flax {tr['flax']}): "
                f"{tr['seconds']:.2f}s -> {tr['tokens_per_s']:.0f} tokens/s ({tr['cpu_s']:.2f} CPU-s; first call "
                f"{tr['first_call_s']:.1f}s)"
            )
            print(
                f"[tunix] ring_jax / Tunix = {results['ring_jax_noshared_tokens_per_s'] / tr['tokens_per_s']:.2f}x "
                f"wall, {tr['cpu_s'] / results['ring_jax_noshared_cpu_s']:.2f}x CPU on the same model"
                + (
                    f"; with ring_jax's shared expert ([main]): "
                    f"{results['ring_jax_tokens_per_s'] / tr['tokens_per_s']:.2f}x"
                    if "ring_jax_tokens_per_s" in results
                    else ""
                )
            )
    print("RESULTS " + json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
