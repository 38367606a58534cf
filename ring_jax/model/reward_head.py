"""The reward model's network: the BailingMoe backbone with a scalar value head.

`RewardNet`: the policy's network without its ``lm_head`` (``BailingMoeForCausalLM`` run with
``return_hidden=True, compute_logits=False``) and a value head ``score = h_last . w + b`` (``w`` [H, 1], ``b`` [1],
float32 arithmetic), where ``h_last`` is the final normed hidden state at the LAST REAL TOKEN of the sequence.

Scoring it on a mesh, saving and loading: ``ring_jax.rl.reward_model.LearnedRewardModel``; Bradley-Terry training:
``ring_jax.rl.reward_trainer``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.model.layers import param
from ring_jax.model.transformer import BailingMoeForCausalLM

POLICY_ONLY = ("lm_head",)  # policy parameters the reward model does not have


class ValueHead(nnx.Module):
    """``h . w + b`` -> one float32 scalar per row; ``w`` [H, 1] (logical axes embed, None), ``b`` [1]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.weight = param(rngs, (cfg.hidden_size, 1), ("embed", None), cfg)
        self.bias = param(rngs, (1,), (None,), cfg, init="zeros")

    def __call__(self, h):
        w = self.weight[...].astype(jnp.float32)
        return jnp.einsum("bh,ho->bo", h.astype(jnp.float32), w)[:, 0] + self.bias[...].astype(jnp.float32)[0]


class RewardOutput(NamedTuple):
    scores: jax.Array  # [B] float32
    balance_loss: jax.Array
    z_loss: jax.Array


class RewardNet(nnx.Module):
    """BailingMoe backbone (no lm_head) + `ValueHead` read at ``last_idx`` (the last real token of each row)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.backbone = BailingMoeForCausalLM(cfg, rngs)
        if hasattr(self.backbone, "lm_head"):
            del self.backbone.lm_head  # never used: compute_logits=False
        self.value_head = ValueHead(cfg, rngs)

    def __call__(self, tokens, segment_ids, last_idx) -> RewardOutput:
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        out = self.backbone(tokens, positions, segment_ids, return_hidden=True, compute_logits=False)
        h_last = jnp.take_along_axis(out.hidden, last_idx[:, None, None].astype(jnp.int32), axis=1)[:, 0]
        return RewardOutput(self.value_head(h_last), out.balance_loss, out.z_loss)


def build_reward_net(cfg: ModelConfig, seed: int = 0) -> RewardNet:
    return RewardNet(cfg, nnx.Rngs(params=seed))


__all__ = ["POLICY_ONLY", "RewardNet", "RewardOutput", "ValueHead", "build_reward_net"]
