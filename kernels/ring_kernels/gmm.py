"""Grouped matmul (GMM) over variable-size expert groups, and its transpose (TGMM), as Pallas kernels.

Layout: the M rows of ``lhs`` are grouped contiguously by expert in increasing expert order; group e occupies rows
``offsets[e]:offsets[e+1]`` with ``offsets`` the exclusive cumsum of ``group_sizes``.  Rows at or past
``sum(group_sizes)`` belong to no group and produce zeros.

gmm schedule (computed in jnp, O(E + row tiles)): a row tile of ``tm`` rows may straddle group boundaries, so the
work is a list of *visits* = (row tile, group) pairs with a non-empty intersection, ordered by tile then group.
Because groups are contiguous and increasing, "all tiles of group 0, then all tiles of group 1, ..." is already
that order, so the list is built per group: a non-empty group e spans tiles first_e..last_e.  At most
``num_row_tiles + E - 1`` visits exist (each group boundary inside a tile adds one), which is the static length
of the schedule.  Tables handed to the kernel (int32, read with scalar loads):
    visit_group[v]   the group of visit v (entries past the real count are never read),
    tile_start[i]    first visit of row tile i (tile i owns visits tile_start[i] .. tile_start[i+1]-1),
    offsets[e]       group row boundaries (for the row masks).
Grid = (row tiles, N tiles); program (i, j) owns output block (i, j) (no races, no atomics, one store); it walks
its visits, runs the K loop against ``rhs[group]`` and adds the result under the mask of rows in that group.

tgmm: grid = (E, K tiles, N tiles); program (e, a, b) walks the row tiles overlapping group e (computed in-kernel
from the offsets) and accumulates ``mask(lhs_tile)^T @ dout_tile``.  Empty groups write zeros.

Both kernels read ``rhs`` / ``lhs`` / ``dout`` as whole arrays with ``pl.ds`` slices at data-dependent offsets:
on GPU (Triton) that is plain pointer arithmetic on global memory; on TPU (Mosaic) whole-array refs live in VMEM,
so this portable form only fits small weights there -- a production TPU path would move the group-indexed operand
to ``PrefetchScalarGridSpec`` index maps (megablox style).  Verified: results in interpret mode on CPU, and that
the Pallas lowering to Triton IR (GPU) and Mosaic MLIR (TPU) succeeds (tests/kernels/test_lowering.py, from CPU).
Not verified: the Triton/PTX and Mosaic backend compilers, i.e. running on real hardware, and performance.

``gmm`` has a custom_vjp: d_lhs = gmm(d_out, rhs^T) (the kernel reads rhs transposed in place, no copy) and
d_rhs = tgmm(lhs, d_out); tile sizes per pass via ``GmmTiling``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.typing import DTypeLike

from ring_kernels._common import (
    backend,
    cdiv,
    compiler_params,
    dot_precision,
    fit_tile,
    pad_to,
    resolve_interpret,
    round_up,
    scalar_spec,
)

Tile = tuple[int, int, int]

DEFAULT_TILE: Tile = (128, 128, 128)


class GmmTiling(NamedTuple):
    """(tm, tk, tn) per pass.  fwd/dlhs: rows x contraction x output columns of the gmm;
    drhs (tgmm): (tm = row chunk walked in the loop, tk = K block of the output, tn = N block of the output)."""

    fwd: Tile = DEFAULT_TILE
    dlhs: Tile = DEFAULT_TILE
    drhs: Tile = DEFAULT_TILE


def _as_tiling(tiling) -> GmmTiling:
    if tiling is None:
        return GmmTiling()
    if isinstance(tiling, GmmTiling):
        return tiling
    t = tuple(int(v) for v in tiling)
    return GmmTiling(t, t, t)


def _offsets(group_sizes, m: int):
    """Exclusive cumsum with the total at the end, clipped to the row count (robust to sum(sizes) > M)."""
    ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends.astype(jnp.int32)])


# ================================================================================================ references
def gmm_ref(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type: DTypeLike = jnp.float32,
    **_: object,
) -> jax.Array:
    return lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=preferred_element_type)


def tgmm_ref(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    preferred_element_type: DTypeLike = jnp.float32,
    **_: object,
) -> jax.Array:
    e = group_sizes.shape[0] if num_groups is None else num_groups
    offs = _offsets(group_sizes, lhs.shape[0])
    rows = jnp.arange(lhs.shape[0])
    member = ((rows[:, None] >= offs[None, :-1]) & (rows[:, None] < offs[None, 1:])).astype(lhs.dtype)  # [M, E]
    return jnp.einsum("me,mk,mn->ekn", member[:, :e], lhs, dout, preferred_element_type=preferred_element_type)


# ================================================================================================ schedule
def make_schedule(group_sizes: jax.Array, m: int, tm: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Visit tables for the gmm kernel (see the module docstring).  Returns (visit_group, tile_start, offsets)."""
    e = group_sizes.shape[0]
    nt = cdiv(m, tm)
    v_max = nt + e - 1
    offs = _offsets(group_sizes, m)
    lo, hi = offs[:-1], offs[1:]
    nonempty = hi > lo
    first = lo // tm
    last = (hi - 1) // tm
    nvis = jnp.where(nonempty, last - first + 1, 0).astype(jnp.int32)
    vend = jnp.cumsum(nvis)  # visits of group e are [vend[e] - nvis[e], vend[e])
    v = jnp.arange(v_max, dtype=jnp.int32)
    g = jnp.searchsorted(vend, v, side="right").astype(jnp.int32)  # group of visit v (== e for v >= total)
    valid = g < e
    g = jnp.minimum(g, e - 1)
    tile = jnp.where(valid, first[g] + v - (vend[g] - nvis[g]), nt)  # invalid visits sort after every tile
    tile_start = jnp.searchsorted(tile, jnp.arange(nt + 1, dtype=jnp.int32), side="left").astype(jnp.int32)
    return g, tile_start, offs


# ================================================================================================ gmm kernel
def _gmm_kernel(vgroup_ref, tstart_ref, offs_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, nk, transpose_rhs, prec):
    i = pl.program_id(0)
    j = pl.program_id(1)
    n0 = pl.multiple_of(j * tn, tn)
    rows = i * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

    def visit(v, acc):
        g = vgroup_ref[v]
        lo = offs_ref[g]
        hi = offs_ref[g + 1]

        def kstep(kk, part):
            k0 = pl.multiple_of(kk * tk, tk)
            x = lhs_ref[:, pl.ds(k0, tk)]  # [tm, tk] of this program's row block
            if transpose_rhs:  # rhs stored [E, N, K]
                w = rhs_ref[g, pl.ds(n0, tn), pl.ds(k0, tk)]
                d = lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)
            else:  # rhs stored [E, K, N]
                w = rhs_ref[g, pl.ds(k0, tk), pl.ds(n0, tn)]
                d = lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)
            return part + d

        part = lax.fori_loop(0, nk, kstep, jnp.zeros((tm, tn), jnp.float32))
        return acc + jnp.where((rows >= lo) & (rows < hi), part, 0.0)

    acc = lax.fori_loop(tstart_ref[i], tstart_ref[i + 1], visit, jnp.zeros((tm, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def _gmm_pallas(lhs, rhs, group_sizes, tile: Tile, out_dtype, interpret, transpose_rhs: bool = False):
    m, k = lhs.shape
    if transpose_rhs:
        e, n, k2 = rhs.shape
    else:
        e, k2, n = rhs.shape
    assert k == k2, (lhs.shape, rhs.shape)
    interpret = resolve_interpret(interpret)
    lo = 128 if (not interpret and backend() == "tpu") else 8
    tm = fit_tile(tile[0], m, 8 if lo == 128 else lo)
    tk, tn = fit_tile(tile[1], k, lo), fit_tile(tile[2], n, lo)
    if not interpret and backend() == "gpu":  # tl.dot needs every dim >= 16
        tm, tk, tn = max(tm, 16), max(tk, 16), max(tn, 16)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    dt = jnp.promote_types(lhs.dtype, rhs.dtype)
    lhs_p = pad_to(lhs.astype(dt), (mp, kp))
    rhs_p = pad_to(rhs.astype(dt), (e, np_, kp) if transpose_rhs else (e, kp, np_))
    vgroup, tstart, offs = make_schedule(group_sizes, m, tm)
    sspec = scalar_spec(interpret)
    out = pl.pallas_call(
        functools.partial(
            _gmm_kernel, tm=tm, tk=tk, tn=tn, nk=kp // tk, transpose_rhs=transpose_rhs, prec=dot_precision()
        ),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // tm, np_ // tn),
        in_specs=[
            sspec,
            sspec,
            sspec,
            pl.BlockSpec((tm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec(),  # whole rhs: the group is picked per visit inside the kernel
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="gmm",
    )(vgroup, tstart, offs, lhs_p, rhs_p)
    return out[:m, :n]


# ================================================================================================ tgmm kernel
def _tgmm_kernel(offs_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn, prec):
    e = pl.program_id(0)
    k0 = pl.multiple_of(pl.program_id(1) * tk, tk)
    n0 = pl.multiple_of(pl.program_id(2) * tn, tn)
    lo = offs_ref[e]
    hi = offs_ref[e + 1]
    # lax.div (truncating) instead of // : the operands are >= 0, and jnp's floor-division emits a sign op that
    # Mosaic lowers per TPU generation
    t0 = lax.div(lo, tm)
    t1 = jnp.where(hi > lo, lax.div(hi + tm - 1, tm), t0)  # empty group: no tiles

    def step(t, acc):
        r0 = pl.multiple_of(t * tm, tm)
        rows = r0 + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        x = lhs_ref[pl.ds(r0, tm), pl.ds(k0, tk)]
        x = jnp.where((rows >= lo) & (rows < hi), x, jnp.zeros_like(x))
        d = dout_ref[pl.ds(r0, tm), pl.ds(n0, tn)]
        return acc + lax.dot_general(x, d, (((0,), (0,)), ((), ())), precision=prec, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(t0, t1, step, jnp.zeros((tk, tn), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: Tile | GmmTiling | None = DEFAULT_TILE,
    preferred_element_type: DTypeLike = jnp.float32,
    interpret: bool | None = None,
) -> jax.Array:
    """Transposed grouped matmul: out[e] = lhs[rows of e]^T @ dout[rows of e]  -> [E, K, N]; zeros for empty groups."""
    m, k = lhs.shape
    m2, n = dout.shape
    assert m == m2, (lhs.shape, dout.shape)
    e = group_sizes.shape[0]
    tile = tiling.drhs if isinstance(tiling, GmmTiling) else (DEFAULT_TILE if tiling is None else tuple(tiling))
    interpret = resolve_interpret(interpret)
    lo = 128 if (not interpret and backend() == "tpu") else 8
    tm = fit_tile(tile[0], m, lo)
    tk, tn = fit_tile(tile[1], k, lo), fit_tile(tile[2], n, lo)
    if not interpret and backend() == "gpu":
        tm, tk, tn = max(tm, 16), max(tk, 16), max(tn, 16)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    dt = jnp.promote_types(lhs.dtype, dout.dtype)
    lhs_p = pad_to(lhs.astype(dt), (mp, kp))
    dout_p = pad_to(dout.astype(dt), (mp, np_))
    offs = _offsets(group_sizes, m)
    sspec = scalar_spec(interpret)
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn, prec=dot_precision()),
        out_shape=jax.ShapeDtypeStruct((e, kp, np_), preferred_element_type),
        grid=(e, kp // tk, np_ // tn),
        in_specs=[sspec, pl.BlockSpec(), pl.BlockSpec()],
        out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="tgmm",
    )(offs, lhs_p, dout_p)
    return out[:, :k, :n]


# ================================================================================================ gmm + custom_vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm(lhs, rhs, group_sizes, tiling: GmmTiling, out_dtype, interpret):
    return _gmm_pallas(lhs, rhs, group_sizes, tiling.fwd, out_dtype, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, tiling, out_dtype, interpret):
    return _gmm_pallas(lhs, rhs, group_sizes, tiling.fwd, out_dtype, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(tiling, out_dtype, interpret, res, dout):
    lhs, rhs, group_sizes = res
    dout = dout.astype(jnp.promote_types(lhs.dtype, rhs.dtype))
    d_lhs = _gmm_pallas(dout, rhs, group_sizes, tiling.dlhs, lhs.dtype, interpret, transpose_rhs=True)
    d_rhs = tgmm(lhs, dout, group_sizes, tiling=tiling.drhs, preferred_element_type=rhs.dtype, interpret=interpret)
    return d_lhs, d_rhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tiling: Tile | GmmTiling | None = DEFAULT_TILE,
    preferred_element_type: DTypeLike = jnp.float32,
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul: out[rows of e] = lhs[rows of e] @ rhs[e]  -> [M, N]; rows past sum(group_sizes) are zero.

    ``tiling``: a (tm, tk, tn) tuple (used for all three passes) or a ``GmmTiling`` (per pass).  Tiles are powers of
    two; they are clamped to the problem and the operands zero-padded to tile multiples.
    """
    out_dtype = jnp.dtype(preferred_element_type)
    return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), _as_tiling(tiling), out_dtype, interpret)
