"""Losses: token cross-entropy as a masked SUM (the step divides by one normaliser for the whole global batch, see
ring_jax.train.step) and the MoE auxiliary terms.

``loss at t = loss_mask[t] * CE(logits[t], targets[t])``, computed in float32 as ``logsumexp(logits) - logits[target]``.
The full-logits path materialises [B, T, V] float32 logits; the chunked path (``ce_chunk > 0``) computes them
``ce_chunk`` positions at a time from the final hidden states under ``jax.checkpoint``, so neither the forward nor
the backward pass holds more than one chunk of logits (needed for long sequences with a 126k vocabulary).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from ring_jax.model.transformer import Output


def token_cross_entropy(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over positions of loss_mask * CE, number of loss tokens), both float32 scalars.
    logits [..., V] (any float dtype, upcast), targets/loss_mask [...] integers."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask != 0
    ce = jnp.where(mask, lse - target_logit, 0.0)
    return jnp.sum(ce), jnp.sum(mask.astype(jnp.float32))


def chunked_cross_entropy(
    hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, loss_mask: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Same result as ``token_cross_entropy(hidden @ head_weight, ...)`` with logits made ``chunk`` positions at a
    time (rematerialised in the backward pass).  hidden [B, T, H], head_weight [H, V]; T is padded to a multiple
    of ``chunk`` with masked positions."""
    b, t, h = hidden.shape
    pad = (-t) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        loss_mask = jnp.pad(loss_mask, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    ms = loss_mask.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(hc, tc, mc):
        logits = jnp.einsum("bth,hv->btv", hc, head_weight, preferred_element_type=jnp.float32)
        return token_cross_entropy(logits, tc, mc)

    def body(carry, xs):
        s, c = one(*xs)
        return (carry[0] + s, carry[1] + c), None

    zero = jnp.zeros((), jnp.float32)
    (total, count), _ = jax.lax.scan(body, (zero, zero), (hs, ts, ms))
    return total, count


@dataclasses.dataclass(frozen=True)
class LossConfig:
    alpha_bal: float = 1e-5  # weight of the MoE load-balance loss (Ring-lite: 1e-5)
    alpha_z: float = 1e-7  # weight of the router z-loss (Ring-lite: 1e-7)
    ce_chunk: int = 0  # 0: full logits; > 0: chunked cross-entropy over this many positions at a time


def moe_aux_loss(out: Output, alpha_bal: float, alpha_z: float) -> jax.Array:
    """``alpha_bal * balance_loss + alpha_z * z_loss`` from a model Output."""
    return alpha_bal * out.balance_loss + alpha_z * out.z_loss


def sft_loss_fn(cfg: LossConfig = LossConfig()) -> Callable:
    """``loss_fn(model, micro_batch) -> (token_loss_sum, aux)`` for ring_jax.train.step.make_train_step.

    aux: ``aux_loss`` (the weighted MoE terms, added to the objective as a mean over micro-batches),
    ``balance_loss``, ``z_loss`` (unweighted, for logging), ``expert_load`` [E] (assignments per expert, mean over
    MoE layers; summed over micro-batches by the step) and ``ce_tokens`` (loss tokens in this micro-batch)."""

    def loss_fn(model, mb):
        seg, pos = mb["segment_ids"], mb["positions"]
        if cfg.ce_chunk > 0:
            out = model(mb["tokens"], pos, seg, return_hidden=True, compute_logits=False)
            total, count = chunked_cross_entropy(
                out.hidden, model.head_weight(), mb["targets"], mb["loss_mask"], cfg.ce_chunk
            )
        else:
            out = model(mb["tokens"], pos, seg)
            total, count = token_cross_entropy(out.logits, mb["targets"], mb["loss_mask"])
        load = out.expert_load
        load = jnp.mean(load, axis=0) if load.shape[0] else jnp.zeros((load.shape[1],), jnp.float32)
        aux = {
            "aux_loss": moe_aux_loss(out, cfg.alpha_bal, cfg.alpha_z),
            "balance_loss": out.balance_loss,
            "z_loss": out.z_loss,
            "expert_load": load,
            "ce_tokens": count,
        }
        return total, aux

    return loss_fn


__all__ = ["LossConfig", "chunked_cross_entropy", "moe_aux_loss", "sft_loss_fn", "token_cross_entropy"]
