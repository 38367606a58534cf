"""Peer side of bench_sampling.py: Tunix's vanilla sampler (``tunix.generate.sampler.Sampler``) generating greedily
on a random Tunix Qwen3-MoE of the benchmark sizes, float32, CPU.

    /work/tunixvenv/bin/python experiments/bench/peers/tunix_sampler.py '{"batch": 16, "prompt": 32, "new": 128, ...}'

API used: ``Sampler(transformer, tokenizer, CacheConfig(cache_size=prompt + new, ...))`` then
``sampler(prompts, max_generation_steps=new, max_prompt_length=prompt, temperature=0.0, eos_tokens=[eos],
forbidden_tokens=[eos])``: one jitted prefill, then one jitted ``lax.while_loop`` of single-token decode steps over
the KV cache.  No top_p / beam -> Tunix's greedy mode.  The end-of-sequence id is forbidden so every row generates
exactly ``new`` tokens (as ring_jax's ignore_eos and transformers' min_new_tokens); the script checks that it did.
The tokenizer is a stand-in with Tunix's duck-typed interface (encode / decode / bos_id / eos_id / pad_id): prompts
are space-separated token ids, no BOS, pad 0, eos 1.

Model: the benchmark MoE as ``tunix.models.qwen3.model.Qwen3`` (vocab 1024, hidden 256, 4 layers, 8 heads / 2 KV
heads, head_dim 32, 8 experts top-2 of width 256, no shared expert; Qwen3's q/k norms, no q/k/v biases).  On CPU
Tunix's MoELayer uses its dense fallback (every expert on every token).

Timing: a warm-up call of the same shapes compiles prefill and decode; then the best of ``repeats`` calls (wall
and that call's process CPU seconds).  Prints its versions, then ``RESULT {json}`` as bench_sampling's torch script
does; on failure ``ERROR <why>`` and the traceback on stderr, exit 1.
"""

import json
import os
import sys
import time
import traceback
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tunix_qwen3moe_step import param_counts, qwen3_config, versions  # noqa: E402

PAD, EOS = 0, 1


class IdTokenizer:
    """Space-separated token ids <-> ids (Tunix's TokenizerAdapter accepts any object with these five methods)."""

    def encode(self, text, **_):
        return [int(t) for t in text.split()]

    def decode(self, ids, **_):
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self):
        return None  # no BOS: the prompt is exactly its ids

    def eos_id(self):
        return EOS

    def pad_id(self):
        return PAD


def main():
    a = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    a = dict(
        dict(
            layers=4,
            hidden=256,
            heads=8,
            kv_heads=2,
            experts=8,
            top_k=2,
            expert_width=256,
            vocab=1024,
            batch=16,
            prompt=32,
            new=128,
            repeats=2,
            seed=0,
        ),
        **a,
    )
    v = versions()
    print("versions " + json.dumps(v), flush=True)
    import jax
    import numpy as np
    from flax import nnx
    from tunix.generate import sampler as sampler_lib
    from tunix.models.qwen3 import model as qwen3

    cfg_args = types.SimpleNamespace(
        layers=a["layers"],
        vocab=a["vocab"],
        hidden=a["hidden"],
        moe_ffn=a["expert_width"],
        heads=a["heads"],
        kv_heads=a["kv_heads"],
        rope_theta=10000.0,
        experts=a["experts"],
        topk=a["top_k"],
    )
    cfg = qwen3_config(cfg_args)
    model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(params=a["seed"]))
    n_params, active = param_counts(model, cfg_args)
    sampler = sampler_lib.Sampler(
        model,
        IdTokenizer(),
        sampler_lib.CacheConfig(
            cache_size=a["prompt"] + a["new"],
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
        ),
    )
    rng = np.random.default_rng(a["seed"])
    prompts = [" ".join(map(str, row)) for row in rng.integers(3, a["vocab"], (a["batch"], a["prompt"]))]

    def run():
        out = sampler(
            prompts,
            max_generation_steps=a["new"],
            max_prompt_length=a["prompt"],
            temperature=0.0,
            eos_tokens=[EOS],
            forbidden_tokens=[EOS],
        )
        jax.block_until_ready(out.tokens)
        return out

    t0 = time.perf_counter()
    run()  # compiles prefill + decode for these shapes
    compile_s = time.perf_counter() - t0
    times, cpu, out = [], [], None
    for _ in range(a["repeats"]):
        t, c = time.perf_counter(), time.process_time()
        out = run()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    lens = [len(t) for t in out.tokens]
    if lens != [a["new"]] * a["batch"]:
        raise RuntimeError(f"expected {a['new']} generated tokens per row, got lengths {sorted(set(lens))}")
    best = min(times)
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": best,
                "tokens_per_s": a["batch"] * a["new"] / best,
                "cpu_s": cpu[times.index(best)],
                "first_call_s": compile_s,
                "seconds_all": times,
                "params": n_params,
                "active_params": active,
                **v,
                "api": "tunix.generate.sampler.Sampler (greedy)",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        print(f"ERROR Tunix sampler failed: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        sys.exit(1)
