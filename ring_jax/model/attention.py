"""Grouped-query attention with full-head RoPE, segment-aware causal masking and an optional KV cache.

Masking rule (one rule for training, packing, padding and decoding): query i may attend key j iff both carry the same
non-zero segment id and ``position[j] <= position[i]``.  Padding is segment 0.  The KV cache stores post-RoPE keys
together with each slot's segment id and position, so a cached key obeys the same rule.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.model.layers import apply_rope, dtype_of, param

_MASKED = -1e30  # finite: a fully masked (padding) query gets a uniform, finite softmax instead of NaN


# Logical axes of LayerCache.v and .k (names of ring_jax.sharding.LOGICAL_RULES): kv heads before the cache
# length, and the keys stored transposed ([.., D, S]): the layouts the decode step's two matmuls (q k^T, p v) read
# as they are.  With keys as [.., S, D], XLA:CPU copied every layer's K into the other layout at every decode step
# (measured 1.4-1.9x on the attention core at 16-256 rows, BUILD_NOTES.md "Rollouts at RL batch sizes").
CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")
K_CACHE_AXES = ("batch", "kv_heads", "head_dim", "cache_length")


class LayerCache(NamedTuple):
    """Keys and values of every decoder layer (``transformer.KVCache`` without its slot metadata)."""

    k: jax.Array  # [L, B, KVH, D, S] post-RoPE keys, transposed (("layers",) + K_CACHE_AXES)
    v: jax.Array  # [L, B, KVH, S, D] (("layers",) + CACHE_AXES)


class CacheView(NamedTuple):
    """What every layer needs to read/write the cache at this step (shared by all layers)."""

    write_idx: jax.Array  # [B] slot where this call's first token is written (row-wise)
    kv_segment_ids: jax.Array  # [B, S] segment of each cache slot after the write (0 = empty)
    kv_positions: jax.Array  # [B, S] position of each cache slot after the write


def attention_mask(q_seg: jax.Array, q_pos: jax.Array, k_seg: jax.Array, k_pos: jax.Array) -> jax.Array:
    """[B, T, S] boolean: same non-zero segment and key position <= query position."""
    same = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] != 0)
    return same & (k_pos[:, None, :] <= q_pos[:, :, None])


def _attention_fwd_core(q, kt, vt, mask):
    """q [B, T, H, D]; kt, vt [B, KVH, S, D] (heads-major, the KV cache's layout)."""
    b, t, h, d = q.shape
    kvh = kt.shape[1]
    # [B, KVH, G, T, D]: the G query heads sharing a KV head are the rows (g, t) of one matmul per (b, kv head)
    qg = (q / jnp.asarray(math.sqrt(d), q.dtype)).reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bksd->bkgts", qg, kt, preferred_element_type=jnp.float32)
    # additive mask, shared by the heads: score + _MASKED == _MASKED exactly in float32, as the `where` it replaces
    scores = scores + jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)[:, None, None]
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    p = jnp.exp(scores - row_max)  # unnormalised probabilities
    inv = 1.0 / jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32) * inv
    out = out.astype(q.dtype)
    # a fully masked (padding) row: uniform probabilities forward and, like `where`, no gradient to its scores
    inv_grad = jnp.where(row_max > 0.5 * _MASKED, inv, 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d), (qg, kt, vt, p, inv, inv_grad, out)


@jax.custom_vjp
def _attention(q, kt, vt, mask):
    return _attention_fwd_core(q, kt, vt, mask)[0]


def _attention_fwd(q, kt, vt, mask):
    out, res = _attention_fwd_core(q, kt, vt, mask)
    return out, res


def _rows_t(a, p):
    """a^T p over the (G, T) rows of a KV head: a [B, KVH, G, T, X], p [B, KVH, G, T, S] -> [B, KVH, X, S] in
    float32.  (G, T) is merged into one contracting dimension first: with two contracting dimensions and a transposed
    consumer, XLA:CPU emits a bf16 x bf16 -> f32 dot its runtime does not implement ("Unsupported element type for
    DotThunk"), which broke every bfloat16 train step on CPU."""
    b, k, g, t = a.shape[:4]
    return jnp.einsum(
        "bkrx,bkrs->bkxs", a.reshape(b, k, g * t, -1), p.reshape(b, k, g * t, -1), preferred_element_type=jnp.float32
    )


def _attention_bwd(res, dout):
    qg, kt, vt, p, inv, inv_grad, out = res
    b, t, h, d = dout.shape
    kvh = kt.shape[1]
    do = dout.reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4).astype(jnp.float32)  # [B, KVH, G, T, D]
    # softmax backward with rowsum(dP * P) = rowsum(dO * O): no reduction over the [.., T, S] probabilities
    dsum = jnp.sum(do * out.astype(jnp.float32), axis=-1, keepdims=True)
    dp = jnp.einsum("bkgtd,bksd->bkgts", do.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
    ds = (p * (dp - dsum) * inv_grad).astype(qg.dtype)
    # dV^T and dK^T ([B, KVH, D, S]): the [.., T, S] operand stays in its layout, the small one is transposed
    dv = _rows_t((do * inv).astype(vt.dtype), p.astype(vt.dtype))
    dq = jnp.einsum("bkgts,bksd->bkgtd", ds, kt, preferred_element_type=jnp.float32) / math.sqrt(d)
    dk = _rows_t(qg, ds)
    return (
        dq.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(dout.dtype),
        dk.transpose(0, 1, 3, 2).astype(kt.dtype),
        dv.transpose(0, 1, 3, 2).astype(vt.dtype),
        None,
    )


_attention.defvjp(_attention_fwd, _attention_bwd)


# ------------------------------------------------------------------------------------- causal query-block skipping
CAUSAL_BLOCK = 64  # query rows per block of the block-causal path (T == S only); 0 disables it
# the blocks are unrolled in the graph: longer rows take the full path (or attn_chunk) instead of growing the
# program (and its compile time) with T / CAUSAL_BLOCK; measured only at T = 256 (4 blocks, 1.10x the train step)
MAX_CAUSAL_BLOCKS = 16


def _num_causal_blocks(t: int, s: int, block: int | None = None) -> int:
    """Query blocks of the block-causal path for T queries over S keys, or 0 when it does not apply (static)."""
    block = CAUSAL_BLOCK if block is None else block
    if not block or t != s or t % block or t < 2 * block or t // block > MAX_CAUSAL_BLOCKS:
        return 0
    return t // block


def _upper_blocks_visible(mask, n: int):
    """True when some query may attend a key in a later block than its own (the block-causal path then falls back
    to the full one).  [B, T, S] mask, n blocks along both axes."""
    t, s = mask.shape[-2:]
    tb = jnp.arange(t, dtype=jnp.int32)[:, None] // (t // n)
    sb = jnp.arange(s, dtype=jnp.int32)[None, :] // (s // n)
    return jnp.any(mask & (sb > tb))


def _blocked_fwd_core(q, kt, vt, mask, n: int):
    """:func:`_attention_fwd_core` for T == S with query block i (rows [i*bs, (i+1)*bs)) reading only the keys
    [0, (i+1)*bs): exact when every query's visible keys lie in blocks <= its own (``_upper_blocks_visible`` is
    False).  The skipped keys then contribute exp(-1e30 - max) == 0 to every row that sees some key; a fully masked
    row (uniform over all S keys in the full path) gets the skipped keys back exactly: the sum of their values in the
    numerator and their count in the denominator."""
    b, t, h, d = q.shape
    kvh, s = kt.shape[1], kt.shape[2]
    g, bs = h // kvh, t // n
    # [B, KVH, n, G, bs, D]: block i's (g, t) rows are contiguous
    qg = (q / jnp.asarray(math.sqrt(d), q.dtype)).reshape(b, n, bs, kvh, g, d).transpose(0, 3, 1, 4, 2, 5)
    bias = jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)
    vf = vt.astype(jnp.float32)
    outs, ps, invs, igs = [], [], [], []
    for i in range(n):
        si = (i + 1) * bs
        sc = jnp.einsum("bkgtd,bksd->bkgts", qg[:, :, i], kt[:, :, :si], preferred_element_type=jnp.float32)
        sc = sc + bias[:, None, None, i * bs : si, :si]
        row_max = jnp.max(sc, axis=-1, keepdims=True)
        p = jnp.exp(sc - row_max)
        full = row_max <= 0.5 * _MASKED  # fully masked row
        lsum = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vt.dtype), vt[:, :, :si], preferred_element_type=jnp.float32)
        if si < s:
            lsum = lsum + jnp.where(full, float(s - si), 0.0)
            o = o + jnp.where(full, jnp.sum(vf[:, :, si:], axis=2)[:, :, None, None, :], 0.0)
        inv = 1.0 / lsum
        outs.append((o * inv).astype(q.dtype))
        ps.append(p)
        invs.append(inv)
        igs.append(jnp.where(full, 0.0, inv))
    out = jnp.stack(outs, axis=2)  # [B, KVH, n, G, bs, D]
    return out.transpose(0, 2, 4, 1, 3, 5).reshape(b, t, h, d), (qg, tuple(ps), tuple(invs), tuple(igs), out)


def _blocked_bwd_core(res, kt, vt, dout, n: int):
    qg, ps, invs, igs, out = res
    b, t, h, d = dout.shape
    kvh, s = kt.shape[1], kt.shape[2]
    g, bs = h // kvh, t // n
    do = dout.reshape(b, n, bs, kvh, g, d).transpose(0, 3, 1, 4, 2, 5).astype(jnp.float32)
    dqs, dk, dv = [], 0.0, 0.0
    extra = jnp.zeros((b, kvh, d), jnp.float32)  # sum of do * inv over the fully masked rows of earlier blocks
    extras = []
    for i in range(n):
        si = (i + 1) * bs
        p, inv, ig = ps[i], invs[i], igs[i]
        doi = do[:, :, i]
        dsum = jnp.sum(doi * out[:, :, i].astype(jnp.float32), axis=-1, keepdims=True)
        dp = jnp.einsum("bkgtd,bksd->bkgts", doi.astype(vt.dtype), vt[:, :, :si], preferred_element_type=jnp.float32)
        ds = (p * (dp - dsum) * ig).astype(qg.dtype)
        dvi = _rows_t((doi * inv).astype(vt.dtype), p.astype(vt.dtype))
        dqs.append(jnp.einsum("bkgts,bksd->bkgtd", ds, kt[:, :, :si], preferred_element_type=jnp.float32))
        dki = _rows_t(qg[:, :, i], ds)
        pad = ((0, 0), (0, 0), (0, 0), (0, s - si))
        dk = dk + jnp.pad(dki, pad)
        dv = dv + jnp.pad(dvi, pad)
        # key block i+1 onwards: the fully masked rows of blocks <= i (uniform over all keys in the full path)
        extras.append(extra)
        if si < s:
            extra = extra + jnp.sum(jnp.where(ig == 0.0, doi * inv, 0.0), axis=(2, 3))
    # extras[j]: what key block j gets from the fully masked rows of the blocks before it
    dv = dv + jnp.repeat(jnp.stack(extras, axis=-1), bs, axis=-1)
    dq = jnp.stack(dqs, axis=2) / math.sqrt(d)  # [B, KVH, n, G, bs, D]
    return (
        dq.transpose(0, 2, 4, 1, 3, 5).reshape(b, t, h, d).astype(dout.dtype),
        dk.transpose(0, 1, 3, 2).astype(kt.dtype),
        dv.transpose(0, 1, 3, 2).astype(vt.dtype),
    )


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_blocked(q, kt, vt, mask, n):
    return _attention_blocked_fwd(q, kt, vt, mask, n)[0]


def _attention_blocked_fwd(q, kt, vt, mask, n):
    res_shape = jax.eval_shape(lambda *a: _blocked_fwd_core(*a, n)[1], q, kt, vt, mask)

    def fallback(q, kt, vt, mask):  # the full path; its backward recomputes the forward (rare: see _attention_any)
        return _attention_fwd_core(q, kt, vt, mask)[0], jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), res_shape)

    ok = ~_upper_blocks_visible(mask, n)
    out, res = jax.lax.cond(ok, partial(_blocked_fwd_core, n=n), fallback, q, kt, vt, mask)
    return out, (ok, q, kt, vt, mask, res)


def _attention_blocked_bwd(n, saved, dout):
    ok, q, kt, vt, mask, res = saved

    def blocked(q, kt, vt, mask, res, dout):
        return _blocked_bwd_core(res, kt, vt, dout, n)

    def fallback(q, kt, vt, mask, res, dout):
        return _attention_bwd(_attention_fwd_core(q, kt, vt, mask)[1], dout)[:3]

    return (*jax.lax.cond(ok, blocked, fallback, q, kt, vt, mask, res, dout), None)


_attention_blocked.defvjp(_attention_blocked_fwd, _attention_blocked_bwd)


def _attention_any(q, kt, vt, mask):
    """The block-causal path when it applies (T == S, a multiple of CAUSAL_BLOCK, at least two blocks), else the
    full one.  Same values and gradients either way (float32 summation order aside).  The block-causal path checks
    at run time that no query sees a key of a later block (true for any mask of :func:`attention_mask` over keys in
    position order, packed or padded) and otherwise computes the full path."""
    n = _num_causal_blocks(q.shape[1], kt.shape[2])
    if n:
        return _attention_blocked(q, kt, vt, mask, n)
    return _attention(q, kt, vt, mask)


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,H,D], k/v [B,S,KVH,D], mask [B,T,S] -> [B,T,H,D].  q is scaled by 1/sqrt(D) before q k^T and the
    softmax runs in float32 (the reference's order); the probabilities are normalised after the value matmul.

    A custom_vjp built for CPU (measured ~1.6x faster fwd+bwd than autodiff of mask-`where` + softmax at 8 x 256
    tokens, 8 / 2 heads): the G query heads of a KV head are rows of one [G*T, D] x [D, S] matmul, the mask is one
    additive bias shared by the heads, the backward uses rowsum(dO * O) instead of a reduction over the [.., T, S]
    probabilities and computes dK^T, dV^T so that no [.., T, S] array is transposed."""
    return _attention_any(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)


def dot_attention_heads_major(q: jax.Array, kt: jax.Array, vt: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`dot_attention` with kt / vt in the KV cache's [B, KVH, S, D] layout (no transpose of the keys)."""
    return _attention_any(q, kt, vt, mask)


def cached_attention(q: jax.Array, k_t: jax.Array, vt: jax.Array, mask: jax.Array) -> jax.Array:
    """Forward of :func:`dot_attention` over a KV cache: q [B, T, H, D], k_t [B, KVH, D, S] (the cache's transposed
    keys), vt [B, KVH, S, D], mask [B, T, S].  The operations of ``_attention_fwd_core`` in its order (scaled q,
    float32 scores, additive mask, max-subtracted exp, normalised after the value matmul); only the key layout
    differs, so results agree to float32 rounding.  No custom gradient: decoding is not differentiated."""
    b, t, h, d = q.shape
    kvh = k_t.shape[1]
    qg = (q / jnp.asarray(math.sqrt(d), q.dtype)).reshape(b, t, kvh, h // kvh, d).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgtd,bkds->bkgts", qg, k_t, preferred_element_type=jnp.float32)
    scores = scores + jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)[:, None, None]
    p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    inv = 1.0 / jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32) * inv
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def blocked_cached_attention(
    q: jax.Array,
    k_all: jax.Array,
    v_all: jax.Array,
    layer: int | jax.Array,
    q_seg: jax.Array,
    q_pos: jax.Array,
    k_seg: jax.Array,
    k_pos: jax.Array,
    live: int | jax.Array,
    block: int,
) -> jax.Array:
    """:func:`cached_attention` over layer ``layer`` of the stacked cache (k_all [L, B, KVH, D, S], v_all
    [L, B, KVH, S, D]) that reads only the blocks of ``block`` slots holding slots [0, live) (``live``: a traced
    int32, at least the live slots of every row; slots past it must be invisible to every query).  One
    ``fori_loop`` over those blocks with a running max (online softmax, float32): the cost follows ``live``, not S,
    and no layer's cache is copied out of the stack.  Same values as the full softmax up to float32 rounding, for
    every query that sees some key; a query that sees none (segment 0: padding, a finished row) gets the mean of v
    over the blocks read instead of over all S slots (such rows are never read)."""
    b, t, h, d = q.shape
    kvh, s = k_all.shape[2], k_all.shape[4]
    g = h // kvh
    qg = (q / jnp.asarray(math.sqrt(d), q.dtype)).reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)
    n = jnp.clip((live + block - 1) // block, 1, s // block)

    def body(j, carry):
        m, l, acc = carry
        s0 = j * block
        kb = jax.lax.dynamic_slice(k_all, (layer, 0, 0, 0, s0), (1, b, kvh, d, block))[0].astype(q.dtype)
        vb = jax.lax.dynamic_slice(v_all, (layer, 0, 0, s0, 0), (1, b, kvh, block, d))[0].astype(q.dtype)
        mask = attention_mask(
            q_seg,
            q_pos,
            jax.lax.dynamic_slice_in_dim(k_seg, s0, block, axis=1),
            jax.lax.dynamic_slice_in_dim(k_pos, s0, block, axis=1),
        )
        sc = jnp.einsum("bkgtd,bkds->bkgts", qg, kb, preferred_element_type=jnp.float32)
        sc = sc + jnp.where(mask, 0.0, _MASKED).astype(jnp.float32)[:, None, None]
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1, keepdims=True))
        p = jnp.exp(sc - m_new)
        corr = jnp.exp(m - m_new)
        return (
            m_new,
            l * corr + jnp.sum(p, axis=-1, keepdims=True),
            acc * corr + jnp.einsum("bkgts,bksd->bkgtd", p.astype(q.dtype), vb, preferred_element_type=jnp.float32),
        )

    m0 = jnp.full((b, kvh, g, t, 1), _MASKED, jnp.float32)
    _, l, acc = jax.lax.fori_loop(0, n, body, (m0, jnp.zeros_like(m0), jnp.zeros((b, kvh, g, t, d), jnp.float32)))
    return (acc / l).astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_seg: jax.Array,
    q_pos: jax.Array,
    k_seg: jax.Array,
    k_pos: jax.Array,
    chunk: int,
    heads_major: bool = False,
) -> jax.Array:
    """:func:`dot_attention` (with :func:`attention_mask`) computed ``chunk`` queries at a time under
    ``jax.checkpoint``: every query row still takes one float32 softmax over all S keys, so the numerics are those
    of the full computation, but neither pass holds more than ``[B, H, chunk, S]`` scores (the full path holds
    ``[B, H, T, S]``: 64 GiB per row at T = S = 32768).  Rows past T (padding up to a multiple of ``chunk``) are
    computed and dropped; query rows are independent, so they change nothing.  k and v enter the loop in float32 and
    are cast back inside, so their gradients accumulate over the chunks in float32 (exact casts: the values are
    those of k and v).  k, v are [B, S, KVH, D], or [B, KVH, S, D] with ``heads_major`` (the cache's layout); either
    way they are put heads-major once, outside the loop."""
    b, t, h, d = q.shape
    pad = -t % chunk
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_seg = jnp.pad(q_seg, ((0, 0), (0, pad)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    qs = q.reshape(b, n, chunk, h, d).swapaxes(0, 1)
    segs = q_seg.reshape(b, n, chunk).swapaxes(0, 1)
    poss = q_pos.reshape(b, n, chunk).swapaxes(0, 1)
    if not heads_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)

    @jax.checkpoint
    def one(qc, sc, pc, kf, vf):
        return _attention(qc, kf.astype(k.dtype), vf.astype(v.dtype), attention_mask(sc, pc, k_seg, k_pos))

    _, out = jax.lax.scan(lambda c, xs: (c, one(*xs, kf, vf)), None, (qs, segs, poss))
    return out.swapaxes(0, 1).reshape(b, n * chunk, h, d)[:, :t]


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, nh, kvh, d = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_heads, cfg.head_size
        # The reference fuses q, k, v into one `query_key_value` matrix (rows: all Q heads, then K, then V).  We keep
        # them apart so that heads shard cleanly over the tensor axis; ring_jax.hf splits/fuses at the boundary.
        self.q_proj = param(rngs, (h, nh, d), ("embed", "q_heads", "head_dim"), cfg)
        self.k_proj = param(rngs, (h, kvh, d), ("embed", "kv_heads", "head_dim"), cfg)
        self.v_proj = param(rngs, (h, kvh, d), ("embed", "kv_heads", "head_dim"), cfg)
        if cfg.use_qkv_bias:
            self.q_bias = param(rngs, (nh, d), ("q_heads", "head_dim"), cfg, init="zeros")
            self.k_bias = param(rngs, (kvh, d), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = param(rngs, (kvh, d), ("kv_heads", "head_dim"), cfg, init="zeros")
        self.o_proj = param(rngs, (nh, d, h), ("q_heads", "head_dim", "embed"), cfg)
        if cfg.use_bias:
            self.o_bias = param(rngs, (h,), ("norm",), cfg, init="zeros")
        self.use_qkv_bias, self.use_bias = cfg.use_qkv_bias, cfg.use_bias
        self.attn_chunk = cfg.attn_chunk
        self.cache_attn, self.cache_block = cfg.cache_attn, cfg.cache_block
        self.dtype = dtype_of(cfg.dtype)

    def __call__(
        self,
        x,
        cos,
        sin,
        segment_ids,
        positions,
        cache: LayerCache | None = None,
        view: CacheView | None = None,
        layer=None,
    ):
        """``cache``: every layer's keys and values, ``layer`` this one's index in them (static or traced): this
        call's positions are written into that layer's slice in place, and the updated stack is returned."""
        dt = self.dtype
        q = jnp.einsum("bte,ehd->bthd", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bte,ehd->bthd", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bte,ehd->bthd", x, self.v_proj[...].astype(dt))
        if self.use_qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        t = x.shape[1]
        if cache is None:  # k, v [B, T, KVH, D]
            k_seg, k_pos = segment_ids, positions
            new_cache = None
            kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        else:  # write this call's T positions of every row into the cache (k [L, B, KVH, D, S], v [L, B, KVH, S, D])
            b, t = x.shape[:2]
            rows = jnp.arange(b)[:, None]
            cols = view.write_idx[:, None] + jnp.arange(t)[None, :]
            # advanced indices split by slices: the indexed shape is [B, T, KVH, D], that of k and v
            new_cache = LayerCache(
                cache.k.at[layer, rows, :, :, cols].set(k.astype(cache.k.dtype), mode="drop"),
                cache.v.at[layer, rows, :, cols].set(v.astype(cache.v.dtype), mode="drop"),
            )
            k_seg, k_pos = view.kv_segment_ids, view.kv_positions
            if not (self.attn_chunk and t > self.attn_chunk):  # decode, and prefill without attention chunks
                return self._out(self._over_cache(q, new_cache, layer, segment_ids, positions, view)), new_cache
            vt = new_cache.v[layer].astype(dt)
            kt = new_cache.k[layer].astype(dt).swapaxes(2, 3)
        if self.attn_chunk and t > self.attn_chunk:
            out = chunked_attention(q, kt, vt, segment_ids, positions, k_seg, k_pos, self.attn_chunk, heads_major=True)
        else:
            out = dot_attention_heads_major(q, kt, vt, attention_mask(segment_ids, positions, k_seg, k_pos))
        return self._out(out), new_cache

    def _over_cache(self, q, cache: LayerCache, layer, segment_ids, positions, view: CacheView):
        """Attention of this call's queries over layer ``layer`` of the (already written) cache, by
        ``cfg.cache_attn``.  Row r's keys occupy slots [0, write_idx[r] + T) (the engine's left-aligned rows)."""
        b, t = q.shape[:2]
        s = cache.k.shape[-1]
        k_seg, k_pos = view.kv_segment_ids, view.kv_positions
        mode = self.cache_attn
        if mode == "auto":
            mode = "pallas" if jax.default_backend() == "gpu" else "blocked"
        if mode == "pallas" and t == 1:
            from ring_kernels.decode_attention import decode_attention

            out = decode_attention(
                q[:, 0],
                cache.k,
                cache.v,
                layer,
                segment_ids[:, 0],
                positions[:, 0],
                k_seg,
                k_pos,
                view.write_idx + 1,
                block=min(self.cache_block, s),
            )
            return out[:, None]
        block = min(self.cache_block, s)
        if mode != "full" and s > block:
            return blocked_cached_attention(
                q, cache.k, cache.v, layer, segment_ids, positions, k_seg, k_pos, jnp.max(view.write_idx) + t, block
            )
        dt = self.dtype
        return cached_attention(
            q,
            cache.k[layer].astype(dt),
            cache.v[layer].astype(dt),
            attention_mask(segment_ids, positions, k_seg, k_pos),
        )

    def _out(self, out):
        """The output projection of the attention output [B, T, H, D] -> [B, T, E]."""
        dt = self.dtype
        # one [B*T, H*D] x [H*D, E] matmul: as einsum "bthd,hde->bte" XLA:CPU laid the attention output out
        # d-major and copied o_proj into that layout at every call (a full weight copy per layer per decode step)
        b, t, nh, d = out.shape
        out = jnp.dot(out.reshape(b * t, nh * d), self.o_proj[...].astype(dt).reshape(nh * d, -1)).reshape(b, t, -1)
        if self.use_bias:
            out = out + self.o_bias[...].astype(dt)
        return out
