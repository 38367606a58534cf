"""Whole RL steps: C3PO's fixed token budget vs sample-level batching (tokens per optimiser step), and the step time.

    python experiments/bench/bench_rl.py                      # the benchmark MoE, 4 prompts x 4 samples x 64 tokens
    python experiments/bench/bench_rl.py --preset tiny --steps 3 --max_new_tokens 8     # a quick smoke run
    python experiments/bench/bench_rl.py --tunix_python /work/tunixvenv/bin/python       # + Tunix GRPOLearner steps

Every aggregation runs ``--steps`` RL steps (ring_jax.rl.step.RLStep: rollout with the sampling engine on the live
parameters -> rewards -> GRPO advantages -> selection -> k3-KL reference log-probabilities -> update) from the same
initial parameters on the same prompts:

- ``c3po``: responses are taken until their tokens reach the budget Phi (``--budget``), the last one truncated, so
  every step trains on exactly Phi tokens;
- ``seq_mean`` (sample-level GRPO) and ``token_mean``: a fixed number of responses per step
  (``--responses_per_step``), whatever their lengths.

The model is random (default: the MoE of the other benchmarks: 4 layers, hidden 256, 8/2 heads, 8 experts top-2 of
width 256 + 1 shared, vocab 1024, float32), the prompts random token ids and the reward a dummy (the fraction of even
token ids in the response).  A random model rarely samples its end-of-sequence token, so ``--stop_tokens`` random ids
also end a response: each token ends it with probability ~stop_tokens / vocab, which gives the spread of response
lengths a real policy has (a geometric distribution capped at ``--max_new_tokens``).  With ``--budget 0`` Phi is set
to responses_per_step x the expected response length, so both aggregations train on about as many tokens per step
(the default, half the pool, leaves the pool enough tokens that C3PO practically never falls short of Phi).

``--tunix_python`` (an interpreter with google-tunix) then runs ``peers/tunix_grpo_step.py``: Tunix's GRPOLearner on
a Tunix Qwen3-MoE of the same sizes (no shared expert: Qwen3 has none; on CPU Tunix's MoE layer runs every expert on
every token), the same prompts-per-step x samples, <= max_new_tokens at temperature 1, the same stop ids, the same
dummy reward, beta and lr, for max(--steps, 4) steps; its step time (mean / median after the first, compiling, step)
is printed beside ours with the ratios Tunix / ring_jax.  Tunix's GRPO trains on all prompts x samples responses of
a step; c3po trains on Phi tokens and seq_mean on --responses_per_step responses (the rollout is the same size).

Prints a markdown table (tokens per step: mean, std, range; step time median over the steps after the first, which
compiles; the split rollout / reward / reference / train) and a last line ``RESULTS {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_sampling import bench_config as _bench_moe  # noqa: E402  the other benchmarks' MoE
from bench_sampling import run_peer  # noqa: E402

PARTS = ("rollout", "reward", "reference", "train")
TUNIX_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers", "tunix_grpo_step.py")


def bench_config(preset: str):
    """'bench': the MoE of the other benchmarks (bench_sampling.bench_config); else a ring_jax preset."""
    from ring_jax.config import get_preset

    return _bench_moe() if preset == "bench" else get_preset(preset)


def expected_length(p: float, cap: int) -> float:
    """Mean of min(G, cap) for G geometric on {1, 2, ...} with stop probability p."""
    return sum((1 - p) ** g for g in range(cap))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bench", help="'bench' (the other benchmarks' MoE) or a ring_jax preset")
    ap.add_argument("--aggregations", default="c3po,seq_mean")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts_per_step", type=int, default=4)
    ap.add_argument("--samples_per_prompt", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--prompt_len", type=int, default=16)
    ap.add_argument("--stop_tokens", type=int, default=32, help="random token ids that also end a response")
    ap.add_argument("--responses_per_step", type=int, default=8, help="sample-level baselines: responses per step")
    ap.add_argument("--budget", type=int, default=0, help="C3PO Phi (0: responses_per_step x expected length)")
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--beta", type=float, default=1e-3, help="KL weight (0: no reference forward)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num_slots", type=int, default=0, help="decode rows of the engine (0: every rollout at once)")
    ap.add_argument("--tunix_python", default="", help="interpreter with google-tunix: also time Tunix GRPOLearner")
    a = ap.parse_args(argv)

    import jax
    import numpy as np

    from ring_jax.model import build_model
    from ring_jax.rewards.registry import register
    from ring_jax.rl.losses import PolicyLossConfig
    from ring_jax.rl.step import RLConfig, RLStep, make_rl_train_step
    from ring_jax.sharding import make_mesh
    from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
    from ring_jax.train.step import (
        abstract_train_state,
        create_train_state,
        global_batch,
        split_model,
        train_state_shardings,
    )

    @register("bench_even_tokens", overwrite=True)
    def _even(record, response):  # dummy reward: fraction of even token ids
        ids = [int(t) for t in response.split()]
        return sum(t % 2 == 0 for t in ids) / max(len(ids), 1)

    cfg = bench_config(a.preset)
    rng = np.random.default_rng(a.seed)
    stop_ids = tuple(int(t) for t in rng.choice(np.arange(3, cfg.vocab_size), a.stop_tokens, replace=False))
    p_stop = (a.stop_tokens + len(cfg.eos_ids)) / cfg.vocab_size
    mean_len = expected_length(p_stop, a.max_new_tokens)
    budget = a.budget or int(round(a.responses_per_step * mean_len))
    n_prompts = a.prompts_per_step * a.steps
    prompts = rng.integers(3, cfg.vocab_size, (n_prompts, a.prompt_len)).tolist()
    records = [{"task": "bench_even_tokens", "prompt_ids": p} for p in prompts]
    print(
        f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}); model {a.preset} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}); {a.prompts_per_step} "
        f"prompts x {a.samples_per_prompt} samples x <= {a.max_new_tokens} new tokens; {a.stop_tokens} stop ids "
        f"(expected response length {mean_len:.1f}); Phi = {budget}; baselines take {a.responses_per_step} "
        f"responses; beta {a.beta}; {a.steps} steps each"
    )

    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    graphdef, pvars, params0 = split_model(build_model(cfg, seed=a.seed))
    results = {"budget": budget, "expected_response_len": mean_len}
    rows = []
    for agg in a.aggregations.split(","):
        rl = RLConfig(
            samples_per_prompt=a.samples_per_prompt,
            aggregation=agg,
            budget=budget,
            responses_per_step=a.responses_per_step,
            max_new_tokens=a.max_new_tokens,
            seq_len=a.seq_len,
            policy=PolicyLossConfig(beta=a.beta),
            num_slots=a.num_slots or a.prompts_per_step * a.samples_per_prompt,
            binary_reward=False,
        )  # the dummy reward is a fraction: keep it graded
        opt, sched = make_optimizer(
            OptimConfig(lr=a.lr, schedule="constant", warmup_steps=0), a.steps, decay_mask(pvars)
        )
        sh = train_state_shardings(pvars, abstract_train_state(params0, opt), mesh)
        state = create_train_state(params0, opt, sh)
        train_step = make_rl_train_step(graphdef, rl, opt, mesh, sh, schedule=sched)
        ref = jax.tree.map(lambda x: x.copy(), state.params) if a.beta else None
        step = RLStep(
            graphdef,
            train_step,
            rl,
            encode_prompt=lambda r: r["prompt_ids"],
            decode=lambda ids: " ".join(map(str, ids)),
            stop_ids=stop_ids,
            ref_params=ref,
            seed=a.seed,
            to_device=lambda b: global_batch(b, mesh),
        )
        tokens, wall, split, n_rows = [], [], {p: [] for p in PARTS}, []
        for i in range(a.steps):
            t0 = time.perf_counter()
            state, m = step(state, records[i * a.prompts_per_step : (i + 1) * a.prompts_per_step])
            wall.append(time.perf_counter() - t0)
            tokens.append(float(m["tokens"]))
            n_rows.append(int(m["rows"]))
            for p in PARTS:
                split[p].append(float(m[f"time/{p}_s"]))
        timed = slice(1, None) if a.steps > 1 else slice(None)  # the first step compiles
        r = {
            "tokens_mean": statistics.fmean(tokens),
            "tokens_std": statistics.pstdev(tokens),
            "tokens_min": min(tokens),
            "tokens_max": max(tokens),
            "tokens": tokens,
            "rows": n_rows,
            "step_s": statistics.median(wall[timed]),
            "first_step_s": wall[0],
            **{f"{p}_s": statistics.median(split[p][timed]) for p in PARTS},
        }
        results[agg] = r
        rows.append((agg, r))
        print(f"[{agg}] tokens per step {tokens}, rows {n_rows}, step s {[round(w, 2) for w in wall]}", flush=True)

    print(
        "| aggregation | tokens/step mean | std | range | rows/step | step s | rollout s | reward s | reference s "
        "| train s | first step s |"
    )
    print("|---" * 11 + "|")
    for agg, r in rows:
        print(
            f"| {agg} | {r['tokens_mean']:.0f} | {r['tokens_std']:.1f} | {r['tokens_min']:.0f}-{r['tokens_max']:.0f}"
            f" | {min(r['rows'])}-{max(r['rows'])} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['reward_s']:.2f} "
            f"| {r['reference_s']:.2f} | {r['train_s']:.2f} | {r['first_step_s']:.1f} |"
        )
    if a.tunix_python:
        results.update(run_tunix(a, cfg, stop_ids, results))
    print("RESULTS " + json.dumps(results))


def run_tunix(a, cfg, stop_ids, ours: dict) -> dict:
    """Tunix GRPOLearner steps on the same shapes (peers/tunix_grpo_step.py); {"tunix_grpo": {...}} or
    {"tunix_error": why}."""
    peer = dict(
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_key_value_heads,
        experts=cfg.num_experts,
        top_k=cfg.num_experts_per_tok,
        expert_width=cfg.moe_intermediate_size,
        vocab=cfg.vocab_size,
        steps=max(a.steps, 4),
        prompts_per_step=a.prompts_per_step,
        samples_per_prompt=a.samples_per_prompt,
        max_new_tokens=a.max_new_tokens,
        prompt_len=a.prompt_len,
        stop_ids=list(stop_ids),
        beta=a.beta,
        lr=a.lr,
        seed=a.seed,
    )
    print(f"[tunix] load average {os.getloadavg()[0]:.1f}; running {TUNIX_PEER} ({peer['steps']} steps)", flush=True)
    t, why = run_peer(a.tunix_python, TUNIX_PEER, peer)
    if t is None:
        print(f"[tunix] failed {why}")
        return {"tunix_error": why}
    print(
        f"[tunix] Tunix {t['tunix']} GRPOLearner (jax {t['jax']}, flax {t['flax']}): step s "
        f"{[round(s, 2) for s in t['step_s']]}; after the first: mean {t['step_s_mean']:.2f}, median "
        f"{t['step_s_median']:.2f} s/step ({t['rows_per_step']} responses/step, mean length "
        f"{t['mean_response_len']:.1f})"
    )
    for agg in ("c3po", "seq_mean", "token_mean"):
        if agg in ours:
            print(
                f"[tunix] Tunix GRPO / ring_jax {agg}: {t['step_s_median'] / ours[agg]['step_s']:.2f}x step time "
                f"(medians)"
            )
    return {"tunix_grpo": t}


if __name__ == "__main__":
    main()
