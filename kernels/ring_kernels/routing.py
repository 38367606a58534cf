"""MoE routing kernels: softmax + top-k router, and the expert-grouping metadata (a counting sort).

``topk_route``      Pallas forward (softmax over experts + k rounds of arg-max), custom_vjp backward in jnp.
``expert_metadata`` Pallas counting sort: per-tile expert counts, then per-assignment sorted positions.
Each has a pure-jnp reference (``topk_route_ref``, ``expert_metadata_ref``).

Verified: interpret mode on CPU (tests/kernels/test_routing.py); Pallas lowering to Triton IR / Mosaic MLIR
(tests/kernels/test_lowering.py).  Not verified: the backend compilers / real hardware.  On TPU the tiles are
multiples of 128 lanes / 8 sublanes by construction below; on GPU every loaded block has a power-of-two size.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ring_kernels._common import backend, compiler_params, next_pow2, pad_to, resolve_interpret, round_up


# ================================================================================================ top-k router
def topk_route_ref(router_logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """float32 softmax -> lax.top_k on probabilities -> optional renormalisation (the HF BailingMoe router)."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = lax.top_k(probs, k)
    if k > 1 and norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids.astype(jnp.int32)


def _weights_given_ids(router_logits, ids, norm: bool):
    """The differentiable part of the router once the (integer) choice is fixed."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    w = jnp.take_along_axis(probs, ids, axis=-1)
    if norm:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return w


def _topk_kernel(logits_ref, w_ref, ids_ref, *, k: int, e_pad: int, k_pad: int, norm: bool):
    x = logits_ref[...].astype(jnp.float32)  # [tt, e_pad]; padded experts hold -inf
    m = jnp.max(x, axis=1, keepdims=True)
    u = jnp.exp(x - m)
    p = u / jnp.sum(u, axis=1, keepdims=True)
    lane = lax.broadcasted_iota(jnp.int32, p.shape, 1)
    col = lax.broadcasted_iota(jnp.int32, (p.shape[0], k_pad), 1)
    w = jnp.zeros((p.shape[0], k_pad), jnp.float32)
    ids = jnp.zeros((p.shape[0], k_pad), jnp.int32)
    for j in range(k):  # k is small (<= 8 for the BailingMoe configs): unrolled arg-max rounds
        best = jnp.max(p, axis=1, keepdims=True)
        arg = jnp.min(jnp.where(p == best, lane, e_pad), axis=1, keepdims=True)  # ties -> lowest expert id
        w = jnp.where(col == j, best, w)
        ids = jnp.where(col == j, arg, ids)
        p = jnp.where(lane == arg, -1.0, p)  # probabilities are >= 0, so -1 is never chosen again
    if norm:
        w = w / jnp.sum(w, axis=1, keepdims=True)  # padded columns are 0
    w_ref[...] = w
    ids_ref[...] = ids


def _topk_pallas(router_logits, k: int, norm: bool, block_tokens: int, interpret):
    t, e = router_logits.shape
    interpret = resolve_interpret(interpret)
    lanes = 128 if (not interpret and backend() == "tpu") else 8
    e_pad = max(lanes, next_pow2(e))
    k_pad = next_pow2(k)  # the block spans the whole (padded) k axis, fine for Mosaic too
    tt = max(8, min(block_tokens, next_pow2(t)))
    t_pad = round_up(t, tt)
    x = pad_to(router_logits.astype(jnp.float32), (t_pad, e_pad), -jnp.inf)
    w, ids = pl.pallas_call(
        functools.partial(_topk_kernel, k=k, e_pad=e_pad, k_pad=k_pad, norm=norm),
        out_shape=(jax.ShapeDtypeStruct((t_pad, k_pad), jnp.float32), jax.ShapeDtypeStruct((t_pad, k_pad), jnp.int32)),
        grid=(t_pad // tt,),
        in_specs=[pl.BlockSpec((tt, e_pad), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((tt, k_pad), lambda i: (i, 0)), pl.BlockSpec((tt, k_pad), lambda i: (i, 0))),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="topk_route",
    )(x)
    return w[:t, :k], ids[:t, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _topk_route(router_logits, k, norm, block_tokens, interpret):
    return _topk_pallas(router_logits, k, norm, block_tokens, interpret)


def _topk_fwd(router_logits, k, norm, block_tokens, interpret):
    w, ids = _topk_pallas(router_logits, k, norm, block_tokens, interpret)
    return (w, ids), (router_logits, ids)


def _topk_bwd(k, norm, block_tokens, interpret, res, cts):
    router_logits, ids = res
    dw, _ = cts  # ids are integers: no cotangent flows through them
    _, vjp = jax.vjp(lambda l: _weights_given_ids(l, ids, norm), router_logits)
    return vjp(dw.astype(jnp.float32))


_topk_route.defvjp(_topk_fwd, _topk_bwd)


def topk_route(
    router_logits: jax.Array, k: int, norm_topk_prob: bool, *, block_tokens: int = 64, interpret: bool | None = None
) -> tuple[jax.Array, jax.Array]:
    """Router: softmax (float32) over experts, top-k, renormalise when k > 1 and ``norm_topk_prob``.

    router_logits [T, E] -> (weights [T, k] float32, ids [T, k] int32).  Differentiable w.r.t. the logits.
    """
    return _topk_route(router_logits, int(k), bool(k > 1 and norm_topk_prob), int(block_tokens), interpret)


# ================================================================================================ metadata
class RoutingMeta(NamedTuple):
    sort_idx: jax.Array  # [T*k] flat assignment index (t*k + j) at each sorted position
    inv_idx: jax.Array  # [T*k] sorted position of each flat assignment (inverse permutation)
    group_sizes: jax.Array  # [E] assignments per expert
    group_offsets: jax.Array  # [E+1] exclusive cumsum of group_sizes, total at the end


def expert_metadata_ref(ids: jax.Array, num_experts: int) -> RoutingMeta:
    flat = ids.reshape(-1).astype(jnp.int32)
    sort_idx = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inv_idx = jnp.zeros_like(sort_idx).at[sort_idx].set(jnp.arange(flat.shape[0], dtype=jnp.int32))
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes).astype(jnp.int32)])
    return RoutingMeta(sort_idx, inv_idx, sizes, offsets)


def _count_kernel(ids_col_ref, counts_ref, *, e_pad: int):
    ids = ids_col_ref[...]  # [ta, 1]; padding holds -1
    lane = lax.broadcasted_iota(jnp.int32, (ids.shape[0], e_pad), 1)
    counts_ref[...] = jnp.sum((ids == lane).astype(jnp.int32), axis=0, keepdims=True)  # [1, e_pad]


def _position_kernel(ids_col_ref, ids_row_ref, base_ref, pos_ref, *, e_pad: int):
    ids_c = ids_col_ref[...]  # [ta, 1]
    ids_r = ids_row_ref[...]  # [1, ta]
    ta = ids_c.shape[0]
    lane = lax.broadcasted_iota(jnp.int32, (ta, e_pad), 1)
    # start of this tile's run inside each expert's group (offset + assignments of that expert in earlier tiles)
    base = jnp.sum(jnp.where(ids_c == lane, base_ref[...], 0), axis=1, keepdims=True)  # [ta, 1]
    # stable rank inside the tile: earlier assignments (a' < a) with the same expert
    a_row = lax.broadcasted_iota(jnp.int32, (ta, ta), 0)
    a_col = lax.broadcasted_iota(jnp.int32, (ta, ta), 1)
    earlier = jnp.where((a_col < a_row) & (ids_r == ids_c), 1, 0)
    pos_ref[...] = base + jnp.sum(earlier, axis=1, keepdims=True)


def expert_metadata(
    ids: jax.Array, num_experts: int, *, block_assignments: int = 128, interpret: bool | None = None
) -> RoutingMeta:
    """Counting sort of the T*k assignments by expert (stable), in two Pallas passes over assignment tiles:

    1. per tile, a one-hot reduction gives the tile's count per expert  -> [tiles, E_pad];
    2. (tiny jnp glue) group sizes / offsets and each tile's starting slot per expert (exclusive cumsums);
    3. per tile, sorted position = starting slot of its expert + number of earlier same-expert assignments
       in the tile (a [ta, ta] comparison, so no scan or atomics are needed).
    sort_idx is the inverse permutation of the positions (one XLA scatter with unique indices).
    """
    interpret = resolve_interpret(interpret)
    flat = ids.reshape(-1).astype(jnp.int32)
    a = flat.shape[0]
    lanes = 128 if (not interpret and backend() == "tpu") else 8
    e_pad = max(lanes, next_pow2(num_experts + 1))
    ta = max(lanes, min(block_assignments, next_pow2(a)))
    a_pad = round_up(max(a, 1), ta)
    nt = a_pad // ta
    flat_p = pad_to(flat, (a_pad,), -1)
    ids_col = flat_p.reshape(a_pad, 1)
    ids_row = flat_p.reshape(1, a_pad)
    cp = compiler_params(interpret)

    tile_counts = pl.pallas_call(
        functools.partial(_count_kernel, e_pad=e_pad),
        out_shape=jax.ShapeDtypeStruct((nt, 1, e_pad), jnp.int32),
        grid=(nt,),
        in_specs=[pl.BlockSpec((ta, 1), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None, 1, e_pad), lambda i: (i, 0, 0)),
        interpret=interpret,
        compiler_params=cp,
        name="expert_counts",
    )(ids_col)[:, 0, :]  # [nt, e_pad]

    sizes_pad = jnp.sum(tile_counts, axis=0)
    offs_pad = jnp.cumsum(sizes_pad) - sizes_pad  # exclusive; offs_pad[E] = total since e_pad > E
    tile_base = offs_pad[None, :] + jnp.cumsum(tile_counts, axis=0) - tile_counts  # [nt, e_pad]

    pos = pl.pallas_call(
        functools.partial(_position_kernel, e_pad=e_pad),
        out_shape=jax.ShapeDtypeStruct((a_pad, 1), jnp.int32),
        grid=(nt,),
        in_specs=[
            pl.BlockSpec((ta, 1), lambda i: (i, 0)),
            pl.BlockSpec((1, ta), lambda i: (0, i)),
            pl.BlockSpec((None, 1, e_pad), lambda i: (i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((ta, 1), lambda i: (i, 0)),
        interpret=interpret,
        compiler_params=cp,
        name="expert_positions",
    )(ids_col, ids_row, tile_base[:, None, :].astype(jnp.int32))

    inv_idx = pos[:a, 0]
    sort_idx = jnp.zeros((a,), jnp.int32).at[inv_idx].set(jnp.arange(a, dtype=jnp.int32), unique_indices=True)
    sizes = sizes_pad[:num_experts].astype(jnp.int32)
    offsets = offs_pad[: num_experts + 1].astype(jnp.int32)
    return RoutingMeta(sort_idx, inv_idx, sizes, offsets)
