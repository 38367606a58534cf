"""Token permutation into expert order and the weighted un-permute + combine, as Pallas kernels with custom_vjps.

One gather kernel serves all four data movements:
    out[r] = sum_j scale[r, j] * src[idx[r, j]]          (float32 accumulation, cast to the output dtype)
    permute fwd          : idx = sort_idx // k   [A, 1], scale = 1
    permute bwd          : idx = inv_idx         [T, k], scale = 1        (a gather, not a scatter-add)
    unpermute_combine fwd: idx = inv_idx         [T, k], scale = weights
    unpermute_combine bwd: idx = sort_idx // k   [A, 1], scale = weights.flat[sort_idx]   (d y_sorted)
plus a row-dot kernel for d weights[t, j] = <d_out[t], y_sorted[inv_idx[t*k+j]]>.

Grid = (row tiles, H tiles); each program gets its [rows, k] slice of the idx/scale tables (SMEM on TPU), loops
over its rows and reads source rows with scalar-indexed ``pl.ds`` slices of the whole source array (Triton:
global-pointer loads of [1, th]; TPU: the whole source sits in VMEM, so only small activations fit -- a production
TPU path would DMA rows from HBM).  Verified: interpret mode on CPU; Pallas lowering to Triton IR / Mosaic MLIR
(tests/kernels/test_lowering.py).  Not verified: the backend compilers / real hardware.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ring_kernels._common import (
    backend,
    compiler_params,
    fit_tile,
    next_pow2,
    pad_to,
    resolve_interpret,
    round_up,
    scalar_spec,
)
from ring_kernels.routing import RoutingMeta

DEFAULT_ROWS = 16  # rows per program
DEFAULT_COLS = 512  # hidden columns per program


# ================================================================================================ references
def permute_ref(x: jax.Array, meta: RoutingMeta, k: int) -> jax.Array:
    return x[meta.sort_idx // k]


def unpermute_combine_ref(y_sorted: jax.Array, meta: RoutingMeta, weights: jax.Array) -> jax.Array:
    t, k = weights.shape
    y = y_sorted[meta.inv_idx].reshape(t, k, -1).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", y, weights.astype(jnp.float32)).astype(y_sorted.dtype)


# ================================================================================================ kernels
def _gather_kernel(idx_ref, scale_ref, src_ref, out_ref, *, tr, th, nj):
    h0 = pl.multiple_of(pl.program_id(1) * th, th)

    def row(r, carry):  # idx_ref / scale_ref hold this program's [tr, nj] slice of the tables
        acc = jnp.zeros((1, th), jnp.float32)
        for j in range(nj):  # nj = k (<= 8) or 1: unrolled
            s = idx_ref[r, j]
            acc = acc + scale_ref[r, j] * src_ref[pl.ds(s, 1), pl.ds(h0, th)].astype(jnp.float32)
        out_ref[pl.ds(r, 1), :] = acc.astype(out_ref.dtype)
        return carry

    lax.fori_loop(0, tr, row, 0)


def _gather(src, idx, scale, out_dtype, *, rows: int, cols: int, interpret):
    """out[r] = sum_j scale[r, j] * src[idx[r, j]] -> [R, H] in out_dtype."""
    s, h = src.shape
    r, nj = idx.shape
    interpret = resolve_interpret(interpret)
    tpu = not interpret and backend() == "tpu"
    tr = fit_tile(rows, r, 8)
    th = fit_tile(cols, h, 128 if tpu else 8)
    rp, hp = round_up(r, tr), round_up(h, th)
    src_p = pad_to(src, (s, hp))
    idx_p = pad_to(idx.astype(jnp.int32), (rp, nj))  # padded rows read src row 0 with scale 0
    scale_p = pad_to(scale.astype(jnp.float32), (rp, nj))
    sspec = scalar_spec(interpret, (tr, nj), lambda a, b: (a, 0))
    out = pl.pallas_call(
        functools.partial(_gather_kernel, tr=tr, th=th, nj=nj),
        out_shape=jax.ShapeDtypeStruct((rp, hp), out_dtype),
        grid=(rp // tr, hp // th),
        in_specs=[sspec, sspec, pl.BlockSpec()],
        out_specs=pl.BlockSpec((tr, th), lambda a, b: (a, b)),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="gather_combine",
    )(idx_p, scale_p, src_p)
    return out[:r, :h]


def _rowdot_kernel(idx_ref, dout_ref, src_ref, out_ref, *, tr, th, nh, nj, nj_pad):
    col = lax.broadcasted_iota(jnp.int32, (1, nj_pad), 1)

    def row(r, carry):
        def hstep(c, acc):
            h0 = pl.multiple_of(c * th, th)
            d = dout_ref[pl.ds(r, 1), pl.ds(h0, th)].astype(jnp.float32)
            for j in range(nj):
                y = src_ref[pl.ds(idx_ref[r, j], 1), pl.ds(h0, th)].astype(jnp.float32)
                acc = acc + jnp.where(col == j, jnp.sum(d * y), 0.0)
            return acc

        out_ref[pl.ds(r, 1), :] = lax.fori_loop(0, nh, hstep, jnp.zeros((1, nj_pad), jnp.float32))
        return carry

    lax.fori_loop(0, tr, row, 0)


def _rowdot(dout, src, idx, *, rows: int, cols: int, interpret):
    """out[r, j] = <dout[r], src[idx[r, j]]> (float32) -> [R, J]."""
    r, h = dout.shape
    nj = idx.shape[1]
    interpret = resolve_interpret(interpret)
    tpu = not interpret and backend() == "tpu"
    tr = fit_tile(rows, r, 8)
    th = fit_tile(cols, h, 128 if tpu else 8)
    nj_pad = next_pow2(nj)
    rp, hp = round_up(r, tr), round_up(h, th)
    dout_p = pad_to(dout, (rp, hp))
    src_p = pad_to(src, (src.shape[0], hp))
    idx_p = pad_to(idx.astype(jnp.int32), (rp, nj))
    out = pl.pallas_call(
        functools.partial(_rowdot_kernel, tr=tr, th=th, nh=hp // th, nj=nj, nj_pad=nj_pad),
        out_shape=jax.ShapeDtypeStruct((rp, nj_pad), jnp.float32),
        grid=(rp // tr,),
        in_specs=[
            scalar_spec(interpret, (tr, nj), lambda a: (a, 0)),
            pl.BlockSpec((tr, hp), lambda a: (a, 0)),
            pl.BlockSpec(),
        ],
        out_specs=pl.BlockSpec((tr, nj_pad), lambda a: (a, 0)),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="combine_dweights",
    )(idx_p, dout_p, src_p)
    return out[:r, :nj]


# ================================================================================================ permute
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _permute(x, meta, k, rows, cols, interpret):
    src_rows = (meta.sort_idx // k)[:, None]
    ones = jnp.ones(src_rows.shape, jnp.float32)
    return _gather(x, src_rows, ones, x.dtype, rows=rows, cols=cols, interpret=interpret)


def _permute_fwd(x, meta, k, rows, cols, interpret):
    return _permute(x, meta, k, rows, cols, interpret), meta


def _permute_bwd(k, rows, cols, interpret, meta, g):
    t = meta.inv_idx.shape[0] // k
    inv = meta.inv_idx.reshape(t, k)
    dx = _gather(g, inv, jnp.ones(inv.shape, jnp.float32), g.dtype, rows=rows, cols=cols, interpret=interpret)
    return dx, None


_permute.defvjp(_permute_fwd, _permute_bwd)


def permute(
    x: jax.Array,
    meta: RoutingMeta,
    k: int,
    *,
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    interpret: bool | None = None,
) -> jax.Array:
    """x [T, H] -> x_sorted [T*k, H] with row p = x[sort_idx[p] // k] (tokens replicated into expert order)."""
    return _permute(x, meta, int(k), int(rows), int(cols), interpret)


# ================================================================================================ unpermute + combine
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _combine(y_sorted, meta, weights, rows, cols, interpret):
    t, k = weights.shape
    inv = meta.inv_idx.reshape(t, k)
    return _gather(y_sorted, inv, weights, y_sorted.dtype, rows=rows, cols=cols, interpret=interpret)


def _combine_fwd(y_sorted, meta, weights, rows, cols, interpret):
    return _combine(y_sorted, meta, weights, rows, cols, interpret), (y_sorted, meta, weights)


def _combine_bwd(rows, cols, interpret, res, g):
    y_sorted, meta, weights = res
    t, k = weights.shape
    src_tok = (meta.sort_idx // k)[:, None]
    w_sorted = weights.reshape(-1).astype(jnp.float32)[meta.sort_idx][:, None]
    dy = _gather(g, src_tok, w_sorted, y_sorted.dtype, rows=rows, cols=cols, interpret=interpret)
    dw = _rowdot(g, y_sorted, meta.inv_idx.reshape(t, k), rows=rows, cols=cols, interpret=interpret)
    return dy, None, dw.astype(weights.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)


def unpermute_combine(
    y_sorted: jax.Array,
    meta: RoutingMeta,
    weights: jax.Array,
    *,
    rows: int = DEFAULT_ROWS,
    cols: int = DEFAULT_COLS,
    interpret: bool | None = None,
) -> jax.Array:
    """y_sorted [T*k, H] (expert order) -> [T, H]: out[t] = sum_j weights[t, j] * y_sorted[inv_idx[t*k + j]],
    accumulated in float32 and cast to y_sorted's dtype.  Differentiable w.r.t. y_sorted and weights."""
    return _combine(y_sorted, meta, weights, int(rows), int(cols), interpret)
