"""Peer side of bench_rl.py: whole GRPO steps with Tunix's ``GRPOLearner`` on a random Tunix Qwen3-MoE of the
benchmark sizes, float32, one CPU device.

    /work/tunixvenv/bin/python experiments/bench/peers/tunix_grpo_step.py '{"steps": 6, "prompts_per_step": 4, ...}'

API used (Tunix's public RL entry points, nothing re-implemented):
  ``tunix.rl.rl_cluster.RLCluster(actor=policy, reference=reference, tokenizer=..., cluster_config=ClusterConfig(
  role_to_mesh={ACTOR, REFERENCE, ROLLOUT: one 1x1 ('fsdp', 'tp') mesh from tunix.utils.mesh.create_mesh},
  rollout_engine='vanilla',
  training_config=RLTrainingConfig(actor_optimizer=optax.adamw(lr), max_steps=steps, ...),
  rollout_config=RolloutConfig(...)))``, then ``tunix.rl.grpo.grpo_learner.GRPOLearner(rl_cluster, GRPOConfig(
  num_generations=samples, num_iterations=1, beta, epsilon=0.2), reward_fns=[reward])`` and ``learner.train(ds)``.
  All roles share the one mesh, so rollout and actor share weights (no weight sync) and rollout is synchronous.
  One learner step = vanilla-sampler rollout of prompts x samples -> reward -> GRPO advantages -> reference
  per-token log-probs (beta > 0) -> one actor update through the PeftTrainer-based RL trainer.

Workload, as bench_rl.py's defaults: ``prompts_per_step`` prompts of ``prompt_len`` random token ids x
``samples_per_prompt`` samples, <= ``max_new_tokens`` new tokens at temperature 1 (top_p 1), responses also end on
``stop_ids`` (the same random stop ids bench_rl draws) or eos; reward = the fraction of even token ids in the
response (a trivial dummy, as ours); beta 1e-3 with a separate reference model; lr 1e-5.  The model is the benchmark
MoE as ``tunix.models.qwen3.model.Qwen3`` (no shared expert; Qwen3's q/k norms, no q/k/v biases; on CPU Tunix's
MoELayer runs its dense fallback, every expert on every token).

Timing: the dataset is a generator, and ``learner.train`` pulls one batch per step only after the previous step's
update (synchronous, colocated roles), so the step times are the gaps between successive pulls (and the last one
up to train() returning).  The first step compiles; reported: mean and median of the others (>= 3 of them).
Prints its versions, then ``RESULT {json}``; on failure ``ERROR <why>`` and the traceback on stderr, exit 1.
"""

import json
import os
import statistics
import sys
import time
import traceback
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tunix_qwen3moe_step import param_counts, qwen3_config, versions  # noqa: E402
from tunix_sampler import EOS, IdTokenizer  # noqa: E402


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
            steps=6,
            prompts_per_step=4,
            samples_per_prompt=4,
            max_new_tokens=64,
            prompt_len=16,
            stop_ids=[],
            beta=1e-3,
            lr=1e-5,
            temperature=1.0,
            seed=0,
        ),
        **a,
    )
    if a["steps"] < 4:
        raise ValueError("need >= 4 steps: the first compiles and >= 3 are averaged")
    v = versions()
    print("versions " + json.dumps(v), flush=True)
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout
    from tunix.utils import mesh as mesh_lib

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
    policy = qwen3.Qwen3(cfg, rngs=nnx.Rngs(params=a["seed"]))
    reference = qwen3.Qwen3(cfg, rngs=nnx.Rngs(params=a["seed"])) if a["beta"] else None  # same init: a copy
    n_params, active = param_counts(policy, cfg_args)
    mesh = mesh_lib.create_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])  # Auto axes, as Tunix wants
    roles = rl_cluster_lib.Role
    n_rows = a["prompts_per_step"] * a["samples_per_prompt"]
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(a["lr"], b1=0.9, b2=0.95, weight_decay=0.1),
            eval_every_n_steps=10**9,
            max_steps=a["steps"],
            mini_batch_size=a["prompts_per_step"],
            checkpoint_root_directory=None,
            pbar_description=None,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=a["max_new_tokens"],
            max_prompt_length=a["prompt_len"],
            kv_cache_size=a["prompt_len"] + a["max_new_tokens"],
            temperature=a["temperature"],
            top_p=1.0,
            top_k=None,
            eos_tokens=[EOS, *a["stop_ids"]],
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=policy, reference=reference, tokenizer=IdTokenizer(), cluster_config=cluster_config
    )

    reward_calls, lengths = [], []

    def even_fraction(prompts, completions, **_):  # dummy reward: fraction of even token ids, as bench_rl's
        reward_calls.append(time.perf_counter())
        out = []
        for c in completions:
            ids = [int(t) for t in c.split()]
            lengths.append(len(ids))
            out.append(sum(t % 2 == 0 for t in ids) / max(len(ids), 1))
        return out

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster,
        reward_fns=[even_fraction],
        algo_config=grpo_learner.GRPOConfig(
            num_generations=a["samples_per_prompt"], num_iterations=1, beta=a["beta"], epsilon=0.2
        ),
    )
    rng = np.random.default_rng(a["seed"] + 1)
    pulls = []

    def dataset():
        for _ in range(a["steps"] + 1):  # one spare: train() stops at max_steps
            pulls.append(time.perf_counter())
            ids = rng.integers(3, a["vocab"], (a["prompts_per_step"], a["prompt_len"]))
            # a numpy array, as Tunix's grain pipelines give: the learner repeats each leaf with np.repeat
            yield {"prompts": np.array([" ".join(map(str, row)) for row in ids])}

    t0 = time.perf_counter()
    learner.train(dataset())
    end = time.perf_counter()
    steps_done = cluster.actor_trainer.train_steps
    if steps_done != a["steps"]:
        raise RuntimeError(f"GRPOLearner ran {steps_done} optimiser steps, expected {a['steps']}")
    marks = pulls[: a["steps"]] + [end]
    step_s = [marks[i + 1] - marks[i] for i in range(a["steps"])]
    gaps = [reward_calls[i + 1] - reward_calls[i] for i in range(len(reward_calls) - 1)]
    timed = step_s[1:]
    print(
        "RESULT "
        + json.dumps(
            {
                "step_s_mean": statistics.fmean(timed),
                "step_s_median": statistics.median(timed),
                "first_step_s": step_s[0],
                "step_s": step_s,
                "reward_gap_s": gaps,
                "setup_s": pulls[0] - t0,
                "rows_per_step": n_rows,
                "mean_response_len": statistics.fmean(lengths) if lengths else None,
                "params": n_params,
                "active_params": active,
                **v,
                "api": "tunix.rl.grpo.grpo_learner.GRPOLearner.train (RLCluster, vanilla rollout)",
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001
        print(f"ERROR Tunix GRPO failed: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        sys.exit(1)
