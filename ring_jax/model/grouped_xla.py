"""Dropless grouped SwiGLU experts in plain XLA, built for CPU: loops over each expert's rows, gathers not scatters.

Layout.  The M = N*k (token, slot) assignments are sorted by expert (``grouping.group_metadata``; ``order``: sorted
row -> assignment n*k+j; ``inv``: its inverse, assignment -> sorted row), so expert e owns the contiguous rows
[start_e, start_e + size_e).
Nothing is padded and no weight is copied per tile: a loop over the experts takes w[e] once, and an inner loop runs
the expert's rows through it in tiles:

- one *tail* tile for the last rem = size - n*T rows (1 <= rem <= T), of the smallest size in a fixed ladder (8, 16,
  ..., 64, 80, 96, 112, 128, 160, ...: four steps per doubling above 64) that holds them (waste < one step);
- then n = (size - 1) // T full tiles of T rows.

Every tile size is a static shape with its own 0/1-trip (tail) or n-trip (full) ``fori_loop``; a tile reads rows
[min(r, M - t), +t) (a clamped dynamic slice, always in bounds) and masks those outside [r, end_e).  The cost is the
routed work, a waste below one ladder step per expert, and a small fixed cost per expert -- so it stays nearly flat
in E at fixed top-k, unlike the padded-tile path whose per-tile weight gather ``w[tile_expert]`` grows with E.

- forward: g = x w_g[e], u = x w_u[e], y = (silu(g) u) w_d[e]; g and u (float32) are kept for the backward.  From a
  full tile of FUSE_MIN_TILE rows on, gate and up run as ONE matmul, [g | u] = x [w_g[e] | w_u[e]], and the backward
  takes [dg | du] as one [t, 2F] operand (measured 1.01-1.03x on the bench train step; with small groups the per-call
  weight concatenation costs more than it saves).
- backward (custom_vjp): the same loops; rows of dy outside the tile are zeroed, d x is written under the row mask,
  and the weight gradients go straight into the [E, ...] float32 outputs: the expert's first tile *sets* its slice,
  later tiles add to it (an expert with no rows gets zeros), so there is no per-expert zero-fill / accumulate / copy.
- permute / combine: gathers in both directions (the transpose of a gather by a permutation is a gather by its
  inverse), never a scatter-add; ``inv`` is computed once (a scatter of iota over int32) and reused.

XLA:CPU details that matter here (each measured, see BUILD_NOTES.md): the loop index must enter the row of a
0/1-trip loop, or XLA hoists the tile's matmuls out of the loop and runs every ladder size for every expert;
identical broadcasts initialising several loop buffers get merged into one plus full-size copies, so buffers whose
initial value is never read get distinct fill values; ``lax.switch`` over the tile sizes copies the loop buffers.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from ring_jax.model.grouping import group_metadata

DEFAULT_TILE = 128  # the smallest automatic full tile: one core's matmuls run near their peak from ~64-128 rows on
MAX_AUTO_TILE = 1024
# gate and up as ONE matmul from this full tile on: the [H, 2F] weight concatenation is one copy per expert per call,
# which small groups do not amortise (64 experts x ~64 rows: 0.95x; 8 experts x ~512 rows: 1.02x)
FUSE_MIN_TILE = 512


def _gate_up(wg, wu, e, levels):
    """Expert e's gate and up weights: one [H, 2F] array when the full tile fuses them (``FUSE_MIN_TILE``), else the
    pair."""
    return jnp.concatenate([wg[e], wu[e]], axis=1) if levels[0] >= FUSE_MIN_TILE else (wg[e], wu[e])


def auto_full_tile(num_assignments: int, num_experts: int) -> int:
    """The full tile when none is set: the power of two >= twice the mean group size (2 M / E), in [DEFAULT_TILE,
    MAX_AUTO_TILE].  A typical expert then runs as ONE tail tile: a single matmul big enough for XLA:CPU to split
    over the cores.  Fixed 128-row tiles run one core's matmuls one after another: on the idle 2-core VM tile 1024
    made the bench train step (M = 4096, E = 8) 1.08x faster than tile 128 (BUILD_NOTES.md)."""
    want = 2 * num_assignments / max(1, num_experts)
    t = DEFAULT_TILE
    while t < want and t < MAX_AUTO_TILE:
        t *= 2
    return t


def tile_levels(tile: int, num_assignments: int, min_tile: int = 8, num_experts: int = 1) -> tuple[int, ...]:
    """(T, tail sizes ascending, the last = T).  T = tile (0: ``auto_full_tile``) clipped to [1, M]; tails step by
    min_tile up to 8 * min_tile, then by twice that up to twice that, and so on (a tail wastes < one step)."""
    t = max(1, min(tile or auto_full_tile(num_assignments, num_experts), num_assignments))
    step, tails = max(1, min(min_tile, t)), []
    v = step
    while v < t:
        tails.append(v)
        if v >= 8 * step:
            step *= 2
        v += step
    return (t, *tails, t)


# ------------------------------------------------------------------------------------------------- permute / combine
def _permute_impl(x, order, inv, k: int):
    return x[order // k]


_permute = jax.custom_vjp(_permute_impl, nondiff_argnums=(3,))


def _permute_fwd(x, order, inv, k):
    return x[order // k], (inv, x.shape[0])


def _permute_bwd(k, res, d):
    inv, n = res  # d x[n] = sum_j d xs[inv[n*k+j]]: a gather, not a scatter-add
    dx = d[inv].reshape(n, k, -1).astype(jnp.float32).sum(axis=1).astype(d.dtype)
    return dx, None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(x: jax.Array, order: jax.Array, inv: jax.Array, k: int) -> jax.Array:
    """x [N,H] -> xs [M,H], xs[p] = x[order[p] // k]."""
    return _permute(x, order, inv, k)


@jax.custom_vjp
def combine(ys: jax.Array, weights: jax.Array, order: jax.Array, inv: jax.Array) -> jax.Array:
    """ys [M,H] sorted -> [N,H] float32: out[n] = sum_j weights[n,j] * ys[inv[n*k+j]]."""
    n, k = weights.shape
    y = ys[inv].reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nkh,nk->nh", y, weights.astype(jnp.float32))


def _combine_fwd(ys, weights, order, inv):
    return combine(ys, weights, order, inv), (ys, weights, order, inv)


def _combine_bwd(res, d):
    ys, weights, order, inv = res
    n, k = weights.shape
    d = d.astype(jnp.float32)
    wf = weights.astype(jnp.float32).reshape(-1)[order]  # routing weight of each sorted row
    dys = (d[order // k] * wf[:, None]).astype(ys.dtype)
    dw = jnp.einsum("nkh,nh->nk", ys[inv].reshape(n, k, -1).astype(jnp.float32), d).astype(weights.dtype)
    return dys, dw, None, None


combine.defvjp(_combine_fwd, _combine_bwd)


# ------------------------------------------------------------------------------------------------- grouped SwiGLU
def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _run_tiles(start, size, levels, tile_fn, carry):
    """Run ``tile_fn(first_row, t, carry, first)`` over one expert's rows [start, start + size): the tail tile
    first (``first=True``; it runs exactly once when size > 0), then the full tiles before it."""
    big, tails = levels[0], levels[1:]
    n_big = jnp.maximum(size - 1, 0) // big
    row, rem = start + n_big * big, size - n_big * big
    chosen = jnp.sum(jnp.asarray(tails, jnp.int32) < rem)  # the smallest tail size >= rem
    for i, t in enumerate(tails):
        take = ((chosen == i) & (rem > 0)).astype(jnp.int32)
        # `row + j * t` (j is always 0): a loop-dependent row keeps XLA from hoisting the tile out of the loop
        carry = lax.fori_loop(0, take, lambda j, c, t=t: tile_fn(row + j * t, t, c, True), carry)
    return lax.fori_loop(0, n_big, lambda j, c: tile_fn(start + j * big, big, c, False), carry)


def _tile_rows(r, t, end, m):
    """Clamped first row of a tile of t rows meant to start at r, and the [t, 1] mask of its rows in [r, end)."""
    r0 = jnp.minimum(r, m - t)
    rows = r0 + jnp.arange(t, dtype=jnp.int32)
    return r0, ((rows >= r) & (rows < end))[:, None]


def _put(buf, val, r0, mask):
    old = lax.dynamic_slice_in_dim(buf, r0, val.shape[0])
    return lax.dynamic_update_slice_in_dim(buf, jnp.where(mask, val.astype(buf.dtype), old), r0, 0)


def _swiglu_fwd(xs, wg, wu, wd, starts, sizes, levels, save: bool):
    """ys [M,H] (and g, u [M,F] float32 when ``save``).  Loops over the experts that have rows only."""
    m, f = xs.shape[0], wg.shape[-1]
    fuse = levels[0] >= FUSE_MIN_TILE  # as in _gate_up
    experts = jnp.argsort(sizes == 0, stable=True).astype(jnp.int32)  # non-empty experts first

    def expert(i, carry):
        e = experts[i]
        wd_e, start = wd[e], starts[e]
        w_in = _gate_up(wg, wu, e, levels)
        end = start + sizes[e]

        def tile(r, t, carry, first):
            r0, mask = _tile_rows(r, t, end, m)
            xt = lax.dynamic_slice_in_dim(xs, r0, t)
            if fuse:
                gu = _dot(xt, w_in)
                g, u = gu[:, :f], gu[:, f:]
            else:
                g, u = _dot(xt, w_in[0]), _dot(xt, w_in[1])
            y = _dot((jax.nn.silu(g) * u).astype(xs.dtype), wd_e)
            return tuple(_put(b, v, r0, mask) for b, v in zip(carry, (y, g, u)))

        return _run_tiles(start, sizes[e], levels, tile, carry)

    # all M rows belong to some expert, so only ys needs a real zero (distinct fills: see the module docstring)
    saved = (jnp.full((m, f), -0.0, jnp.float32), jnp.ones((m, f), jnp.float32)) if save else ()
    init = (jnp.zeros_like(xs), *saved)
    return lax.fori_loop(0, jnp.sum(sizes > 0), expert, init)


def _swiglu_bwd(xs, wg, wu, wd, gs, us, dys, starts, sizes, levels):
    m, f = xs.shape[0], wg.shape[-1]
    fuse = levels[0] >= FUSE_MIN_TILE  # as in _gate_up

    def expert(e, carry):
        wd_e, start, size = wd[e], starts[e], sizes[e]
        w_in = _gate_up(wg, wu, e, levels)
        end = start + size

        def tile(r, t, carry, first):
            dxs, dw = carry
            r0, mask = _tile_rows(r, t, end, m)
            xt = lax.dynamic_slice_in_dim(xs, r0, t)
            dy = jnp.where(mask, lax.dynamic_slice_in_dim(dys, r0, t), 0)  # zero rows: no dW / dx contribution
            g = lax.dynamic_slice_in_dim(gs, r0, t)
            u = lax.dynamic_slice_in_dim(us, r0, t)
            sg = jax.nn.sigmoid(g)
            a = g * sg  # silu(g)
            h = (a * u).astype(xs.dtype)
            dh = _dot(dy, wd_e.T)
            du = (dh * a).astype(xs.dtype)
            dg = (dh * u * sg * (1 + g * (1 - sg))).astype(xs.dtype)
            if fuse:  # gate and up as one [t, 2F] operand: 2 matmuls instead of 4
                dgu = jnp.concatenate([dg, du], axis=1)
                dx = _dot(dgu, w_in.T)
                dwgu = _dot(xt.T, dgu)
                contrib = (dwgu[:, :f], dwgu[:, f:], _dot(h.T, dy))
            else:
                dx = _dot(dg, w_in[0].T) + _dot(du, w_in[1].T)
                contrib = (_dot(xt.T, dg), _dot(xt.T, du), _dot(h.T, dy))
            # the expert's first tile sets its slice of dW, later tiles add to it
            dw = tuple(lax.dynamic_update_index_in_dim(o, c if first else o[e] + c, e, 0) for o, c in zip(dw, contrib))
            return _put(dxs, dx, r0, mask), dw

        def empty(j, carry):  # an expert without rows: zero gradient
            dxs, dw = carry
            return dxs, tuple(lax.dynamic_update_index_in_dim(o, jnp.zeros(o.shape[1:], o.dtype), e + j, 0) for o in dw)

        carry = lax.fori_loop(0, (size == 0).astype(jnp.int32), empty, carry)
        return _run_tiles(start, size, levels, tile, carry)

    # every slice of dW is written before it is read, so the fills are never seen (distinct: no merged broadcast)
    dw = tuple(jnp.full(w.shape, float(i), jnp.float32) for i, w in enumerate((wg, wu, wd)))
    dxs, (dwg, dwu, dwd) = lax.fori_loop(0, wg.shape[0], expert, (jnp.zeros_like(xs), dw))
    return dxs, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu(
    xs: jax.Array,
    wg: jax.Array,
    wu: jax.Array,
    wd: jax.Array,
    starts: jax.Array,
    sizes: jax.Array,
    levels: tuple[int, ...],
) -> jax.Array:
    """ys [M,H]: row p of the expert-sorted xs through the SwiGLU of its expert; expert e owns the rows
    [starts[e], starts[e] + sizes[e]) and ``sum(sizes) == M``.  ``levels`` from ``tile_levels`` (static).
    custom_vjp: d xs, d wg, d wu, d wd (float32 accumulation)."""
    return _swiglu_fwd(xs, wg, wu, wd, starts, sizes, levels, save=False)[0]


def _grouped_fwd(xs, wg, wu, wd, starts, sizes, levels):
    ys, gs, us = _swiglu_fwd(xs, wg, wu, wd, starts, sizes, levels, save=True)
    return ys, (xs, wg, wu, wd, gs, us, starts, sizes)


def _grouped_bwd(levels, res, dys):
    xs, wg, wu, wd, gs, us, starts, sizes = res
    return (*_swiglu_bwd(xs, wg, wu, wd, gs, us, dys, starts, sizes, levels), None, None)


grouped_swiglu.defvjp(_grouped_fwd, _grouped_bwd)


def moe_grouped(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, tile: int = 0
) -> jax.Array:
    """Routed SwiGLU experts, dropless and exact: [N,H] float32 = sum_j weights[n,j] * expert_{ids[n,j]}(x[n]).
    ``tile``: the full tile T (0 = ``auto_full_tile``)."""
    n, k = ids.shape
    levels = tile_levels(tile, n * k, num_experts=wg.shape[0])
    meta = group_metadata(ids, wg.shape[0])
    xs = permute(x, meta.order, meta.inv, k)
    ys = grouped_swiglu(xs, wg, wu, wd, meta.starts, meta.sizes, levels)
    return combine(ys, weights, meta.order, meta.inv)
