"""The C3PO policy loss (Ring-lite Eqs. 3 and 6) and the sample-level baselines, as weighted token sums.

Per trained token t of response i, with r_t = exp(logp_t - old_logp_t):

    l_t = -[ min(r_t A_i, clip(r_t, 1 - eps, 1 + eps) A_i) - beta * KL_t ] - alpha_ent * H_t

KL_t is the k3 estimator of KL(pi_theta || pi_ref): exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (unbiased,
non-negative).  H_t is the entropy of the policy's full next-token distribution; subtracting alpha_ent * H from the
loss rewards exploration.  The step loss is ``sum_t w_t l_t / normaliser``:

- ``c3po``: w_t = 1 on the Phi selected tokens, normaliser = Phi (a constant, never the batch's token count);
- ``token_mean``: w_t = 1, normaliser = the step's token count (DAPO-style token mean);
- ``seq_mean``: w_t = 1 / len_i, normaliser = number of responses (GRPO's mean per sequence, then per batch).

Weights and the normaliser are fixed for the whole step before it is split into micro-batches or devices, so the
loss and gradients do not depend on the split (tests/rl/test_invariance.py).  The MoE balance and z losses are added
by the train step with their own coefficients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

AGGREGATIONS = ("c3po", "token_mean", "seq_mean")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    clip_eps: float = 0.2
    beta: float = 1e-3  # KL(pi || pi_ref) coefficient, k3 estimator; 0 disables the reference model
    alpha_ent: float = 5e-4


def token_logprobs(logits, targets):
    """logits [B,T,V] float32, targets [B,T] -> (log pi(target) [B,T], entropy [B,T])."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return tgt - lse, entropy


def chunked_token_logprobs(hidden, head_weight, targets, chunk: int):
    """:func:`token_logprobs` of ``hidden @ head_weight`` (float32 logits) with the logits made ``chunk`` positions at
    a time under ``jax.checkpoint``: no pass holds more than ``[B, chunk, V]`` logits (the full path holds
    ``[B, T, V]`` float32 twice, 31 GiB per 32k-token row at V = 126k).  hidden [B, T, H], head_weight [H, V]
    (compute dtype).  The head weight enters the loop in float32 and is cast back inside (exact), so its gradient
    accumulates over the chunks in float32."""
    b, t, h = hidden.shape
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    hs = hidden.reshape(b, n, chunk, h).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    wf = head_weight.astype(jnp.float32)

    @jax.checkpoint
    def one(hc, tc, wf):
        logits = jnp.einsum("bth,hv->btv", hc, wf.astype(head_weight.dtype), preferred_element_type=jnp.float32)
        return token_logprobs(logits, tc)

    _, (lp, ent) = jax.lax.scan(lambda c, xs: (c, one(*xs, wf)), None, (hs, ts))
    return lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t], ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def policy_loss_sum(logp, entropy, old_logp, advantages, weights, ref_logp=None, cfg: PolicyLossConfig = PolicyLossConfig()):
    """Weighted sum over tokens of l_t (see module doc) and weighted sums of diagnostics.  All inputs [B,T]."""
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    pg = jnp.minimum(ratio * advantages, clipped * advantages)
    if ref_logp is not None and cfg.beta:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
    else:
        kl = jnp.zeros_like(logp)
    per_token = -(pg - cfg.beta * kl) - cfg.alpha_ent * entropy
    w = weights.astype(jnp.float32)
    trained = (w > 0).astype(jnp.float32)
    stats = {
        "kl_sum": jnp.sum(trained * kl),
        "entropy_sum": jnp.sum(trained * entropy),
        "clip_count": jnp.sum(trained * (jnp.abs(ratio - clipped) > 0)),
        "ratio_sum": jnp.sum(trained * ratio),
        "token_count": jnp.sum(trained),
    }
    return jnp.sum(w * per_token), stats


def token_weights(mode: str, keep: np.ndarray, budget: int | None = None) -> tuple[list[float], float]:
    """Per-response token weight and the step normaliser for an aggregation mode (see module doc)."""
    keep = np.asarray(keep, np.float64)
    if mode == "c3po":
        if budget is None:
            raise ValueError("c3po aggregation needs the token budget Phi")
        return [1.0] * len(keep), float(budget)
    if mode == "token_mean":
        return [1.0] * len(keep), float(max(keep.sum(), 1.0))
    if mode == "seq_mean":
        return [1.0 / k if k > 0 else 0.0 for k in keep], float(max(len(keep), 1))
    raise ValueError(f"loss aggregation {mode!r}: one of {AGGREGATIONS}")
