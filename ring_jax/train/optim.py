"""Optimizer: AdamW with a decoupled weight decay that skips norms and biases, global-norm clipping, and the two
learning-rate schedules of Ring-lite (warm-up + cosine for SFT, warm-up + constant for RL).

The optimizer works on the *pure* parameter tree (``nnx.to_pure_dict`` of the model's ``nnx.Param`` state: nested
dicts of arrays).  Parameters are stored in ``ModelConfig.param_dtype`` (float32 master weights by default) and the
model casts them to ``ModelConfig.dtype`` at use, so bfloat16 compute with float32 master weights and float32 Adam
moments is a config switch; gradients arrive in the parameter dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import optax
from flax import nnx

from ring_jax.utils import is_variable

SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (Ring-lite SFT: 3e-4; RL: 3e-6 with schedule="constant")
    schedule: str = "cosine"  # cosine: warm-up then cosine decay to lr * end_lr_ratio; constant: warm-up then flat
    warmup_ratio: float = 0.01  # fraction of total_steps spent warming up (ignored when warmup_steps >= 0)
    warmup_steps: int = -1  # explicit warm-up length; -1 = round(warmup_ratio * total_steps)
    end_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping threshold; <= 0 disables clipping

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: one of {SCHEDULES}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")

    def num_warmup(self, total_steps: int) -> int:
        w = self.warmup_steps if self.warmup_steps >= 0 else int(round(self.warmup_ratio * total_steps))
        return min(w, total_steps)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """lr(t) for update t = 0, 1, ...  Warm-up: lr * t / w for t < w (starts at 0).  Cosine (t >= w):
    end + (lr - end) * (1 + cos(pi * min(t - w, D) / D)) / 2 with D = total_steps - w and end = lr * end_lr_ratio."""
    w = cfg.num_warmup(total_steps)
    if cfg.schedule == "cosine" and w == 0:
        return optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1), alpha=cfg.end_lr_ratio)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=cfg.lr,
            warmup_steps=w,
            decay_steps=max(total_steps, w + 1),
            end_value=cfg.lr * cfg.end_lr_ratio,
        )
    if w == 0:
        return optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, w), optax.constant_schedule(cfg.lr)], [w])


def decay_mask(param_state: nnx.State) -> dict:
    """Pure tree of bools: True where weight decay applies.  Off for parameters whose logical axes include 'norm'
    and for every 1-D parameter (norm weights, biases), counted per layer: the leading ``layers`` axis of the
    stacked decoder layers does not count.  ``param_state``: an nnx State of Variables (concrete or abstract)
    carrying ``logical_axes`` metadata."""

    def one(v):
        axes = v.get_metadata().get("logical_axes") or ()
        return not ("norm" in axes or len(v.get_value().shape) - ("layers" in axes) <= 1)

    return nnx.to_pure_dict(jax.tree.map(one, param_state, is_leaf=is_variable))


def make_optimizer(
    cfg: OptimConfig, total_steps: int, mask: dict | Callable[[dict], dict] | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optax transformation, schedule).  ``mask``: a tree of bools like :func:`decay_mask`, or a callable
    params -> such a tree; None decays every parameter with more than one dimension."""
    if mask is None:
        mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*parts), schedule


def cosine_closed_form(cfg: OptimConfig, total_steps: int, t: int) -> float:
    """The schedule in plain Python (documentation and test oracle)."""
    w = cfg.num_warmup(total_steps)
    if t < w:
        return cfg.lr * t / w
    if cfg.schedule == "constant":
        return cfg.lr
    d = max(total_steps - w, 1)
    end = cfg.lr * cfg.end_lr_ratio
    return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * min(t - w, d) / d))


__all__ = ["OptimConfig", "SCHEDULES", "cosine_closed_form", "decay_mask", "make_optimizer", "make_schedule"]
