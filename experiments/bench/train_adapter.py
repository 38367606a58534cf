"""The library's SFT train step behind one call, for the benchmarks (bench_train.py, bench_scan.py) and
experiments/device_check.py: ``run = bench_adapter(cfg); loss = run(tokens)``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ring_jax.config import ModelConfig
from ring_jax.model.transformer import build_model
from ring_jax.sharding import make_mesh
from ring_jax.train.losses import LossConfig, sft_loss_fn
from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
from ring_jax.train.step import (
    abstract_train_state,
    create_train_state,
    make_train_step,
    split_model,
    train_state_shardings,
)


def bench_adapter(cfg: ModelConfig, seed: int = 0, lr: float = 1e-4) -> Callable[..., jax.Array]:
    """``run(tokens) -> loss``: ``ring_jax.train.step.make_train_step`` on one device, next-token cross-entropy over
    ``tokens`` [B, T] (position t predicts t + 1; the last position carries no loss), AdamW (b2 0.95, weight decay
    0.1, constant lr, no clipping), no MoE aux loss, one micro-batch; each call takes one step."""
    graphdef, pvars, params = split_model(build_model(cfg, seed))
    optimizer, schedule = make_optimizer(
        OptimConfig(lr=lr, schedule="constant", warmup_steps=0, clip_norm=0.0), 1, decay_mask(pvars)
    )
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    shardings = train_state_shardings(pvars, abstract_train_state(params, optimizer, seed), mesh)
    box = [create_train_state(params, optimizer, shardings, seed)]
    step = make_train_step(
        graphdef, sft_loss_fn(LossConfig(alpha_bal=0.0, alpha_z=0.0)), optimizer, mesh, shardings, 1, schedule=schedule
    )

    def run(tokens):
        tokens = jnp.asarray(tokens, jnp.int32)
        b, t = tokens.shape
        batch = {
            "tokens": tokens,
            "targets": jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1),
            "loss_mask": jnp.broadcast_to((jnp.arange(t) < t - 1).astype(jnp.int32), (b, t)),
            "segment_ids": jnp.ones((b, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        }
        box[0], metrics = step(box[0], batch)
        return metrics["loss"]

    return run
