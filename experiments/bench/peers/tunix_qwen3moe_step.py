"""Peer side of bench_train.py: a Tunix Qwen3-MoE training step (forward + backward + optax AdamW, float32, CPU),
driven over stdin/stdout with the same protocol as torch_qwen2moe_step.py so the parent interleaves its timings.

The step is Tunix's own: ``tunix.sft.peft_trainer.PeftTrainer.jit_train_and_eval_step()`` returns the trainer's
jitted train step (``nnx.jit`` of ``PeftTrainer._train_step``: ``nnx.value_and_grad`` of the loss, the global grad
norm, ``nnx.Optimizer.update``), called here once per step on a ``TrainingInput``.  The loss is Tunix's default
PEFT loss (next-token cross entropy over the masked targets, no router aux loss); ``with_gen_model_input_fn``
builds positions and the causal mask with ``tunix.sft.utils`` inside the jitted step, as Tunix's SFT examples do.
The optimiser is optax.adamw(lr 1e-4, betas 0.9/0.95, wd 0.1), as on the other sides.

Model: ``tunix.models.qwen3.model.Qwen3`` with a ModelConfig of the benchmark MoE's sizes (vocab 1024, hidden 256,
4 layers, 8 heads / 2 KV heads, head_dim 32, 8 experts top-2 of width 256, no shared expert, untied embeddings, RoPE
theta 1e4, float32, random init).  Differences that are Qwen3's, not ours: q/k RMSNorm and no q/k/v biases.  On CPU
Tunix's MoELayer takes its "vanilla dense routing" fallback (every expert on every token, then the top-k
weighted sum) because its Megablox path is TPU-only: that is what Tunix runs on this machine.

Run by the Tunix interpreter (/work/tunixvenv/bin/python: google-tunix + CPU jax).  Protocol, one JSON object per
line:
  child -> parent, once ready:  {"ready": true, "params": ..., "active_params": ..., "tunix": ..., "jax": ..., ...}
                                or {"error": "..."} if Tunix could not be imported or the step failed
  parent -> child:              {"cmd": "time", "steps": K}
  child -> parent:              {"seconds": [wall s per step], "cpu_seconds": process CPU s of the K steps, "loss"}
  parent -> child:              {"cmd": "peak", "n": 2048, "reps": 5}   child -> parent: {"flops": ...}
  parent -> child:              {"cmd": "quit"}
"""

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("google-tunix", "jax", "jaxlib", "flax", "optax"):
        try:
            out[dist.replace("google-", "")] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist.replace("google-", "")] = None
    return out


def qwen3_config(a):
    """The benchmark MoE as a Tunix Qwen3 ModelConfig (shared by the sampler and GRPO peers)."""
    import jax.numpy as jnp
    from tunix.models.qwen3 import model as qwen3

    return qwen3.ModelConfig(
        num_layers=a.layers,
        vocab_size=a.vocab,
        embed_dim=a.hidden,
        hidden_dim=a.moe_ffn,
        num_heads=a.heads,
        head_dim=a.hidden // a.heads,
        num_kv_heads=a.kv_heads,
        rope_theta=int(a.rope_theta),
        norm_eps=1e-6,
        use_tied_embedding=False,
        num_experts=a.experts,
        num_experts_per_tok=a.topk,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )


def param_counts(model, a) -> tuple[int, int]:
    import jax
    from flax import nnx

    n = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return n, n - a.layers * (a.experts - a.topk) * 3 * a.hidden * a.moe_ffn


def main():
    p = argparse.ArgumentParser()
    for name, default in (
        ("vocab", 1024),
        ("hidden", 256),
        ("layers", 4),
        ("heads", 8),
        ("kv_heads", 2),
        ("experts", 8),
        ("topk", 2),
        ("moe_ffn", 256),
        ("batch", 8),
        ("seq", 256),
        ("seed", 0),
        ("warmup", 2),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--rope_theta", type=float, default=10000.0)
    a = p.parse_args()
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        from flax import nnx
        from tunix.models.qwen3 import model as qwen3
        from tunix.sft import peft_trainer
        from tunix.sft import utils as sft_utils
    except Exception as e:  # noqa: BLE001  report why, as one line the parent prints
        send({"error": f"Tunix import failed: {type(e).__name__}: {e}", "versions": versions()})
        raise

    try:
        model = qwen3.Qwen3(qwen3_config(a), rngs=nnx.Rngs(params=a.seed))
        trainer = peft_trainer.PeftTrainer(
            model,
            optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1),
            peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**9, pbar_description=None),
        )

        def gen_model_input(x):
            return {
                "input_tokens": x.input_tokens,
                "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(x.input_mask),
                "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask),
            }

        trainer = trainer.with_gen_model_input_fn(gen_model_input)
        train_step, _ = trainer.jit_train_and_eval_step()
        rng = np.random.default_rng(a.seed)
        tokens = jnp.asarray(rng.integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
        batch = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=jnp.ones_like(tokens, dtype=jnp.bool_))

        def step():
            loss, _aux, _gnorm = train_step(batch)
            return loss

        for _ in range(a.warmup):
            jax.block_until_ready(step())
        n_params, active = param_counts(model, a)
        send(
            {
                "ready": True,
                "params": n_params,
                "active_params": active,
                **versions(),
                "devices": str(jax.devices()),
                "step": "PeftTrainer.jit_train_and_eval_step()",
                "moe_path": "Tunix MoELayer dense CPU fallback (all experts on every token)",
            }
        )
    except Exception as e:  # noqa: BLE001
        send({"error": f"Tunix train step failed: {type(e).__name__}: {e}", "versions": versions()})
        raise

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "time":
            secs, loss = [], None
            c0 = time.process_time()
            for _ in range(cmd["steps"]):
                t0 = time.perf_counter()
                loss = float(jax.block_until_ready(step()))
                secs.append(time.perf_counter() - t0)
            send({"seconds": secs, "cpu_seconds": time.process_time() - c0, "loss": loss})
        elif cmd["cmd"] == "peak":
            n = cmd.get("n", 2048)
            x = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
            f = jax.jit(lambda u, v: u @ v)
            jax.block_until_ready(f(x, x))
            best = float("inf")
            for _ in range(cmd.get("reps", 5)):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, x))
                best = min(best, time.perf_counter() - t0)
            send({"flops": 2.0 * n**3 / best})
        elif cmd["cmd"] == "quit":
            break


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
