"""The C3PO policy loss (Ring-lite Eqs. 3 and 6) and the sample-level baselines, as weighted token sums.

Per trained token t of response i, with r_t = exp(logp_t - old_logp_t):

    l_t = -[ w_t^IS min(r_t A_i, clip(r_t, 1 - eps, 1 + eps) A_i) - beta * KL_t ] - alpha_ent * H_t

r_t compares the trained policy with pi_old, the temperature-1 log-probabilities of the policy that sampled (the
engine's ``raw_logprobs``): with several updates per rollout (``RLConfig.updates_per_rollout``) r_t moves away from 1
after the first update and the clip acts.  w_t^IS is the truncated importance weight between the sampler and pi_old
(:func:`tis_weights`; 1 when the rollout samples the policy itself, at temperature 1 with no top-p / top-k), held
constant.  KL_t is the k3 estimator of KL(pi_theta || pi_ref): exp(ref_t - logp_t) - (ref_t - logp_t) - 1 (unbiased,
non-negative).  H_t is the entropy of the policy's full next-token distribution; subtracting alpha_ent * H from the
loss rewards exploration.  The step loss is ``sum_t w_t l_t / normaliser``:

- ``c3po``: w_t = 1 on the Phi selected tokens, normaliser = Phi (a constant, never the batch's token count);
- ``token_mean``: w_t = 1, normaliser = the step's token count (DAPO-style token mean);
- ``seq_mean``: w_t = 1 / len_i, normaliser = number of responses (GRPO's mean per sequence, then per batch).

Weights and the normaliser are fixed for the whole step before it is split into micro-batches or devices, so the
loss and gradients do not depend on the split (``tests/rl/test_rl_step.py``, against a NumPy oracle).  The MoE
balance and z losses are added by the train step with their own coefficients.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

AGGREGATIONS = ("c3po", "token_mean", "seq_mean")
TIS_LEVELS = ("token", "sequence")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    clip_eps: float = 0.2
    beta: float = 1e-3  # KL(pi || pi_ref) coefficient, k3 estimator; 0 disables the reference model
    alpha_ent: float = 5e-4


def token_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [B,T,V] float32, targets [B,T] -> (log pi(target) [B,T], entropy [B,T])."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    entropy = lse - jnp.sum(probs * logits, axis=-1)
    return tgt - lse, entropy


def chunked_token_logprobs(
    hidden: jax.Array, head_weight: jax.Array, targets: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
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


def tis_weights(
    old_logp: npt.ArrayLike, sampler_logp: npt.ArrayLike, cap: float, level: str = "token"
) -> tuple[np.ndarray, np.ndarray]:
    """Truncated importance sampling between the sampler and pi_old, for one response (host side, NumPy).

    ``old_logp`` [G]: log pi_old(y_t) at temperature 1 (what the loss's ratio uses); ``sampler_logp`` [G]: the
    log-probability of y_t under the distribution it was actually drawn from (after temperature / top-k / top-p:
    ``Completion.logprobs``).  ``level="token"`` (verl's and slime's default): w_t = min(pi_old(y_t) / q(y_t), cap);
    ``"sequence"``: every token gets min(prod_t pi_old(y_t) / q(y_t), cap), which makes the estimate unbiased for a
    whole response where per-token weights are not (their prefix is still drawn from q).  ``cap <= 0``: no correction
    (all weights 1).  Returns (weights [G] float32, truncated [G] bool: the untruncated weight exceeded ``cap``).

    Top-p / top-k never sample the tail they cut, so no weighting of the samples recovers the tail's share of the
    gradient: the correction removes the bias on the sampler's support only (tests/rl/test_tis.py)."""
    old = np.asarray(old_logp, np.float64)
    q = np.asarray(sampler_logp, np.float64)
    if old.shape != q.shape:
        raise ValueError(f"old_logp {old.shape} and sampler_logp {q.shape} differ")
    if cap <= 0:
        return np.ones(old.shape, np.float32), np.zeros(old.shape, bool)
    if level not in TIS_LEVELS:
        raise ValueError(f"TIS level {level!r}: one of {TIS_LEVELS}")
    log_w = old - q if level == "token" else np.full(old.shape, float(np.sum(old - q)))
    w = np.exp(np.minimum(log_w, 80.0))
    return np.minimum(w, cap).astype(np.float32), w > cap


def policy_loss_sum(
    logp: jax.Array,
    entropy: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    weights: jax.Array,
    ref_logp: jax.Array | None = None,
    cfg: PolicyLossConfig = PolicyLossConfig(),
    tis: jax.Array | None = None,
    pg_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum over tokens of l_t (see module doc) and weighted sums of diagnostics.  All inputs [B,T];
    ``tis``: the importance weights w^IS (None: 1); ``pg_mask``: 0 where a token gets no policy-gradient term
    (IcePop: its trainer / sampler probability ratio left the band), 1 elsewhere (None: 1).  A masked token keeps
    its KL and entropy terms.

    Diagnostics over trained tokens (weight > 0): ``clip_count`` (tokens where the clip acts: the clipped term is the
    smaller one, so the token passes no policy gradient; verl's ``pg_clipfrac``),
    ``ratio_sum`` / ``ratio_max``, ``approx_kl_sum`` (k3 estimate of KL(pi_old || pi_theta): (r - 1) - log r per
    token), ``kl_sum`` (to pi_ref), ``entropy_sum``, ``token_count``."""
    ratio = jnp.exp(logp - old_logp)
    clipped = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    pg = jnp.minimum(ratio * advantages, clipped * advantages)
    if tis is not None:
        pg = jax.lax.stop_gradient(tis.astype(jnp.float32)) * pg
    if pg_mask is not None:
        pg = jnp.where(pg_mask > 0, pg, 0.0)
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
        "clip_count": jnp.sum(trained * (clipped * advantages < ratio * advantages)),
        "ratio_sum": jnp.sum(trained * ratio),
        "ratio_max": jnp.max(jnp.where(trained > 0, ratio, 0.0)),
        "approx_kl_sum": jnp.sum(trained * ((ratio - 1.0) - (logp - old_logp))),
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
