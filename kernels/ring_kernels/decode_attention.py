"""Decode attention over a stacked KV cache that reads only each row's live blocks, as a Pallas kernel.

One decode step: every row b has one query per head, q [B, H, D], and attends the keys of its cache row in layer
``layer`` of ``k [L, B, KVH, D, S]`` (keys stored transposed, the engine's layout) and ``v [L, B, KVH, S, D]``, under
the model's masking rule (same non-zero segment id, key position <= query position).  Row b's keys live in slots
[0, lengths[b]); the kernel visits only the ``ceil(lengths[b] / block)`` blocks that hold them, with an online
(running max) softmax in float32, so a row's cost follows its own length and not the cache length S.

Grid = (B, KVH): one program per (row, KV head) computes the G = H / KVH query heads that share that KV head as the
rows of one [G, D] x [D, block] product per block.  The cache refs are whole arrays (Triton: global pointers; the
program loads [D, block] / [block, D] tiles with ``pl.ds`` at the scalar ``layer``, ``b`` and KV-head indices), the
per-row tables (lengths, query segment / position) are scalar tables.  On a TPU a whole-array ref would have to sit
in VMEM, so this kernel is for GPUs (and interpret mode on CPU); the CPU / TPU path is the blocked XLA loop of
``ring_jax.model.attention.blocked_cached_attention``, which reads the blocks up to the longest row.

A row with no visible key (segment 0: an empty or finished slot) returns the mean of v over its visited blocks (the
XLA paths return a mean over some set of slots too: such rows are never read).  Verified: interpret mode on CPU
against :func:`decode_attention_ref`, and the Pallas -> Triton lowering from this host (tests/kernels/); not run
on a GPU here.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ring_kernels._common import cdiv, compiler_params, next_pow2, pad_to, resolve_interpret, scalar_spec

_MASKED = -1e30  # the model's additive mask value (ring_jax.model.attention._MASKED)
DEFAULT_BLOCK = 128  # cache slots per block


def decode_attention_ref(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: int | jax.Array,
    q_seg: jax.Array,
    q_pos: jax.Array,
    k_seg: jax.Array,
    k_pos: jax.Array,
) -> jax.Array:
    """Plain-jnp reference: softmax over every slot of the layer's cache.  q [B, H, D]; k [L, B, KVH, D, S];
    v [L, B, KVH, S, D]; q_seg, q_pos [B]; k_seg, k_pos [B, S] -> [B, H, D] in q's dtype."""
    b, h, d = q.shape
    kvh = k.shape[2]
    qg = (q.astype(jnp.float32) / math.sqrt(d)).reshape(b, kvh, h // kvh, d)
    sc = jnp.einsum("bkgd,bkds->bkgs", qg, k[layer].astype(jnp.float32))
    mask = (k_seg == q_seg[:, None]) & (q_seg[:, None] != 0) & (k_pos <= q_pos[:, None])
    sc = sc + jnp.where(mask, 0.0, _MASKED)[:, None, None, :]
    p = jax.nn.softmax(sc, axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", p, v[layer].astype(jnp.float32))
    return out.reshape(b, h, d).astype(q.dtype)


def _kernel(tab_ref, q_ref, k_ref, v_ref, kseg_ref, kpos_ref, out_ref, *, block, d, scale):
    """tab_ref [B, 4] int32: (live slots, query segment, query position, layer) per row."""
    b, kv = pl.program_id(0), pl.program_id(1)
    n, qs, qp, layer = tab_ref[b, 0], tab_ref[b, 1], tab_ref[b, 2], tab_ref[b, 3]
    q = q_ref[0, 0].astype(jnp.float32) * scale  # [G, D]
    g = q.shape[0]

    def step(j, carry):
        m, l, acc = carry
        s0 = pl.multiple_of(j * block, block)
        kb = k_ref[layer, b, kv, :, pl.ds(s0, block)].astype(jnp.float32)  # [D, block]
        vb = v_ref[layer, b, kv, pl.ds(s0, block), :].astype(jnp.float32)  # [block, D]
        seg = kseg_ref[pl.ds(b, 1), pl.ds(s0, block)]  # [1, block]
        pos = kpos_ref[pl.ds(b, 1), pl.ds(s0, block)]
        sc = jnp.dot(q, kb, preferred_element_type=jnp.float32)  # [G, block]
        sc = sc + jnp.where((seg == qs) & (qs != 0) & (pos <= qp), 0.0, _MASKED)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1, keepdims=True))
        p = jnp.exp(sc - m_new)
        corr = jnp.exp(m - m_new)
        return (
            m_new,
            l * corr + jnp.sum(p, axis=1, keepdims=True),
            acc * corr + jnp.dot(p, vb, preferred_element_type=jnp.float32),
        )

    init = (jnp.full((g, 1), _MASKED, jnp.float32), jnp.zeros((g, 1), jnp.float32), jnp.zeros((g, d), jnp.float32))
    m, l, acc = lax.fori_loop(0, cdiv(n, block), step, init)
    out_ref[0, 0] = (acc / jnp.maximum(l, 1e-30)).astype(out_ref.dtype)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: int | jax.Array,
    q_seg: jax.Array,
    q_pos: jax.Array,
    k_seg: jax.Array,
    k_pos: jax.Array,
    lengths: jax.Array,
    *,
    block: int = DEFAULT_BLOCK,
    interpret: bool | None = None,
) -> jax.Array:
    """:func:`decode_attention_ref` reading only slots [0, lengths[b]) of row b, in blocks of ``block`` slots
    (``lengths`` [B] int32, at most S; slots past it must be invisible to the row, as the engine's cache rows are).
    ``layer``: an int or a traced int32 scalar.  Returns [B, H, D] in q's dtype."""
    b, h, d = q.shape
    nl, _, kvh, _, s = k.shape
    g = h // kvh
    interpret = resolve_interpret(interpret)
    block = min(block, s)
    if s % block:
        raise ValueError(f"cache length {s} is not a multiple of the block {block}")
    # Triton's dot needs every dimension >= 16 (and powers of two): pad the query heads per KV head and D
    gp = g if interpret else max(16, next_pow2(g))
    dp = d if interpret else max(16, next_pow2(d))
    qg = pad_to(q.reshape(b, kvh, g, d), (b, kvh, gp, dp))
    kp = pad_to(k, (nl, b, kvh, dp, s))
    vp = pad_to(v, (nl, b, kvh, s, dp))
    tab = jnp.stack([jnp.clip(lengths, 0, s), q_seg, q_pos, jnp.broadcast_to(layer, (b,))], axis=1).astype(jnp.int32)
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, d=dp, scale=1.0 / math.sqrt(d)),
        out_shape=jax.ShapeDtypeStruct((b, kvh, gp, dp), q.dtype),
        grid=(b, kvh),
        in_specs=[
            scalar_spec(interpret),
            pl.BlockSpec((1, 1, gp, dp), lambda i, j: (i, j, 0, 0)),
            pl.BlockSpec(),
            pl.BlockSpec(),
            pl.BlockSpec(),
            pl.BlockSpec(),
        ],
        out_specs=pl.BlockSpec((1, 1, gp, dp), lambda i, j: (i, j, 0, 0)),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="decode_attention",
    )(tab, qg, kp, vp, k_seg.astype(jnp.int32), k_pos.astype(jnp.int32))
    return out[:, :, :g, :d].reshape(b, h, d)


__all__ = ["DEFAULT_BLOCK", "decode_attention", "decode_attention_ref"]
