"""Sampling rules on a batch of logits [B, V] with per-row parameters (arrays, so mixing greedy and sampled rows,
or different temperatures, never recompiles).

Order (as Hugging Face's logits processors): temperature -> top-k -> top-p.  Masked logits become -inf.
Ties at a top-k / top-p threshold keep every tied token (the mask is ``logit >= threshold``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


def _sorted_desc(logits):
    return -jnp.sort(-logits, axis=-1)


def top_k_mask(logits, k):
    """Boolean [B, V]: the k largest logits of each row (k [B] int; k <= 0 keeps everything)."""
    v = logits.shape[-1]
    kk = jnp.where(k <= 0, v, jnp.minimum(k, v))
    thresh = jnp.take_along_axis(_sorted_desc(logits), (kk - 1)[:, None], axis=-1)
    return logits >= thresh


def top_p_mask(logits, p):
    """Boolean [B, V]: the smallest set of most likely tokens whose probability mass is >= p (p [B]; p >= 1 keeps
    everything).  A token is kept iff the mass of the tokens strictly more likely than it is < p."""
    s = _sorted_desc(logits)
    probs = jax.nn.softmax(s, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(before < p[:, None], axis=-1), 1)
    thresh = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)
    return (logits >= thresh) | (p[:, None] >= 1.0)


def filter_logits(logits, top_k, top_p):
    """Top-k then top-p (on the top-k renormalised distribution) with one sort; masked entries -> -inf."""
    v = logits.shape[-1]
    s = _sorted_desc(logits)
    rank = jnp.arange(v)[None, :]
    kk = jnp.where(top_k <= 0, v, jnp.minimum(top_k, v))
    in_k = rank < kk[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, s, NEG_INF), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    thresh = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= thresh, logits, NEG_INF)


def sampling_logprobs(logits, temperature, top_k, top_p, *, filtered: bool):
    """log_softmax of the distribution actually sampled from (greedy rows: temperature treated as 1)."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / t[:, None]
    if filtered:
        scaled = filter_logits(scaled, top_k, top_p)
    return jax.nn.log_softmax(scaled, axis=-1)


def sample_tokens(logits, keys, temperature, top_k, top_p, *, filtered: bool):
    """One token per row.  logits [B, V] float32, keys [B] typed PRNG keys, temperature/top_p [B] float32,
    top_k [B] int32; ``filtered`` (static) turns the top-k/top-p sort on.

    Returns (tokens [B] int32, logprob under the sampling distribution [B] (0 for greedy rows),
    raw logprob = log_softmax(logits) at the token [B])."""
    logits = logits.astype(jnp.float32)
    raw_lp = jax.nn.log_softmax(logits, axis=-1)
    lp_all = sampling_logprobs(logits, temperature, top_k, top_p, filtered=filtered)
    sampled = jax.vmap(jax.random.categorical)(keys, lp_all)
    greedy = temperature <= 0
    tok = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    pick = lambda a: jnp.take_along_axis(a, tok[:, None], axis=-1)[:, 0]  # noqa: E731
    lp = jnp.where(greedy, 0.0, pick(lp_all))
    return tok, lp, pick(raw_lp)
