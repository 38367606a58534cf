"""Sampling rules on a batch of logits [B, V] with per-row parameters (arrays, so mixing greedy and sampled rows,
or different temperatures, never recompiles).

Order (as Hugging Face's logits processors): temperature -> top-k -> top-p.  Masked logits become -inf.
Ties at a top-k / top-p threshold keep every tied token (the mask is ``logit >= threshold``).

No sort over the vocabulary: XLA:CPU sorts a [256, 1024] batch in ~100 ms, longer than the whole decode step.  The
top-k and top-p thresholds are found by bisection over the 2^32 float32 values in order (:func:`_threshold`, 32
passes of a compare and a masked sum over [B, V], exact), and every reduction is a plain max / min / sum (XLA:CPU's
argmax, a variadic (value, index) reduce, is 2-3x slower and slower still when it fuses the Gumbel noise).  Tokens
and log-probs are those of jax.random.categorical on the filtered log-probs with the same keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")


def first_argmax(x: jax.Array) -> jax.Array:
    """``jnp.argmax(x, axis=-1)`` (the first index of the maximum; the first NaN if any) as two plain reductions."""
    v = x.shape[-1]
    iota = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    m = jnp.max(x, axis=-1, keepdims=True)
    return jnp.min(jnp.where((x == m) | jnp.isnan(x), iota, v), axis=-1).astype(jnp.int32)


def _ordered(x):
    """float32 -> uint32 with the same order (-0.0 and 0.0 map to one value, as they compare equal)."""
    i = lax.bitcast_convert_type(x + 0.0, jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _threshold(pred, lo, hi):
    """Per row, the smallest ``t`` in (lo, hi] with ``pred(t)`` true, for a predicate monotone in t (false at lo,
    true at hi; uint32 keys of :func:`_ordered`).  32 bisection steps: exact over the whole uint32 range."""

    def body(_, c):
        lo, hi = c
        mid = lo + (hi - lo) // 2
        ok = pred(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return lax.fori_loop(0, 32, body, (lo, hi))[1]


def top_k_mask(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean [B, V]: the k largest logits of each row and every logit tied with the k-th (k [B] int; k <= 0 keeps
    everything)."""
    v = logits.shape[-1]
    kk = jnp.where(k <= 0, v, jnp.minimum(k, v))[:, None]
    keys = _ordered(logits.astype(jnp.float32))
    lo = jnp.min(keys, axis=-1, keepdims=True)
    # the k-th largest key: the largest t with count(key >= t) >= k, i.e. one below the smallest t with count < k
    fewer = _threshold(
        lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) < kk, lo, jnp.max(keys, axis=-1, keepdims=True) + 1
    )
    return keys >= fewer - 1


def top_p_mask(logits: jax.Array, p: jax.Array, *, base: jax.Array | None = None) -> jax.Array:
    """Boolean [B, V]: the smallest set of most likely tokens whose probability mass is >= p (p [B]; p >= 1 keeps
    everything).  A token is kept iff the mass of the tokens strictly more likely than it is < p.  ``base``: an
    optional [B, V] mask the distribution is renormalised over first (top-k); tokens outside it are never kept."""
    lg = logits.astype(jnp.float32)
    if base is not None:
        lg = jnp.where(base, lg, NEG_INF)
    probs = jax.nn.softmax(lg, axis=-1)
    keys = _ordered(lg)
    pp = p[:, None]

    def mass_above_below_p(t):  # monotone in t: the mass strictly above t shrinks as t grows
        return jnp.sum(jnp.where(keys > t, probs, 0.0), axis=-1, keepdims=True) < pp

    top = jnp.max(keys, axis=-1, keepdims=True)
    lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # everything above: mass ~1 >= p (else keep all, below)
    t = _threshold(mass_above_below_p, lo, top)
    keep = (keys >= jnp.where(mass_above_below_p(lo), lo, t)) | (pp >= 1.0)
    return keep if base is None else keep & base


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k then top-p (on the top-k renormalised distribution); masked entries -> -inf.  Each filter runs only
    when some row uses it (``lax.cond``)."""
    every = jnp.ones(logits.shape, bool)
    in_k = lax.cond(jnp.any(top_k > 0), top_k_mask, lambda *_: every, logits, top_k)
    keep = lax.cond(jnp.any(top_p < 1.0), lambda: top_p_mask(logits, top_p, base=in_k), lambda: in_k)
    return jnp.where(keep, logits, NEG_INF)


def sampling_logprobs(
    logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *, filtered: bool
) -> jax.Array:
    """log_softmax of the distribution actually sampled from (greedy rows: temperature treated as 1)."""
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / t[:, None]
    if filtered:
        scaled = filter_logits(scaled, top_k, top_p)
    return jax.nn.log_softmax(scaled, axis=-1)


def sample_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    filtered: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row.  logits [B, V] float32, keys [B] typed PRNG keys, temperature/top_p [B] float32,
    top_k [B] int32; ``filtered`` (static) turns the top-k/top-p thresholds on.

    A sampled row draws ``argmax(log-probs + Gumbel noise)`` with the noise of ``jax.random.gumbel(key, [V])``:
    ``jax.random.categorical(key, log-probs)`` to the bit.  When no row samples (all greedy), the noise, the
    filters and the sampling log-probs are skipped (a ``lax.cond``: only the taken branch runs).

    Returns (tokens [B] int32, logprob under the sampling distribution [B] (0 for greedy rows),
    raw logprob = log_softmax(logits) at the token [B])."""
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    pick = lambda a, tok: jnp.take_along_axis(a, tok[:, None], axis=-1)[:, 0]  # noqa: E731
    v = logits.shape[-1]

    def draw(_):  # greedy rows take the argmax of their raw logits in the same pass
        lp_all = sampling_logprobs(logits, temperature, top_k, top_p, filtered=filtered)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)
        tok = first_argmax(jnp.where(greedy[:, None], logits, noise + lp_all))
        return tok, jnp.where(greedy, 0.0, pick(lp_all, tok))

    def argmax_only(_):
        return first_argmax(logits), jnp.zeros(greedy.shape, jnp.float32)

    tok, lp = lax.cond(jnp.any(~greedy), draw, argmax_only, None)
    return tok, lp, pick(jax.nn.log_softmax(logits, axis=-1), tok)
