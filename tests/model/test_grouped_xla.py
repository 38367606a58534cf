"""The grouped XLA MoE path (ring_jax/model/grouped_xla.py, the default ``dispatch`` impl) vs the dense oracle:
values and gradients w.r.t. x, the three expert weight tensors and the routing weights, on awkward routings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench.moe_gather import moe_dispatch_gather
from ring_jax.model.grouped_xla import (
    DEFAULT_TILE,
    FUSE_MIN_TILE,
    MAX_AUTO_TILE,
    auto_full_tile,
    combine,
    permute,
    tile_levels,
)
from ring_jax.model.grouping import group_metadata
from ring_jax.model.moe import moe_dense, moe_dispatch, route


def _case(seed, n, h, f, e, k, routing):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    ws = tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h)))
    weights, ids, _ = route(jnp.asarray(rng.normal(size=(n, e)), jnp.float32), k, True)
    if routing == "one":  # every token on the same k experts: k full groups, the rest empty
        ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), ids.shape)
    elif routing == "skewed":  # most assignments on a few experts, several experts empty
        p = np.exp(-np.arange(e) / 1.5)
        ids = np.stack([rng.choice(e, size=k, replace=False, p=p / p.sum()) for _ in range(n)])
        ids = jnp.asarray(ids, jnp.int32)
    return x, ws, weights, ids


def _value_and_grads(fn, x, ws, weights, ids):
    def loss(x, wg, wu, wd, w):
        return jnp.sum(jnp.sin(fn(x, w, ids, wg, wu, wd)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, *ws, weights)


def _check(fn, x, ws, weights, ids, rtol=1e-5, atol=2e-5):
    ref_v, ref_g = _value_and_grads(moe_dense, x, ws, weights, ids)
    v, g = _value_and_grads(fn, x, ws, weights, ids)
    np.testing.assert_allclose(v, ref_v, rtol=rtol, atol=atol)
    for name, a, b in zip(("x", "wg", "wu", "wd", "weights"), g, ref_g):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)


# (n, h, f, e, k, routing, tile): tile 0 = the automatic full tile; small tiles force several full tiles per expert
# plus a tail; n*k < 8 exercises a tile clipped to the row count; full tiles >= FUSE_MIN_TILE run gate and up as one
# matmul.
CASES = [
    (37, 16, 24, 8, 2, "random", 0),
    (37, 16, 24, 8, 2, "random", 8),
    (50, 8, 12, 6, 1, "random", 16),  # k = 1
    (40, 8, 16, 12, 6, "random", 32),  # k = 6
    (64, 8, 8, 16, 2, "one", 16),  # all tokens on experts 0, 1: full tiles + tail; 14 empty experts
    (64, 8, 8, 16, 6, "skewed", 24),  # non-power-of-two tile
    (3, 8, 8, 64, 2, "random", 0),  # tiny: 6 assignments over 64 experts
    (1, 8, 8, 4, 1, "random", 0),  # a single assignment
    (2, 8, 8, 4, 3, "one", 0),
    (16, 32, 32, 8, 2, "skewed", 0),  # a decode step of 16 rows (the engine's dense fast path vs dispatch)
    (16, 32, 32, 8, 2, "one", 0),  # ... with 6 of the 8 experts empty
    (300, 8, 12, 4, 2, "skewed", FUSE_MIN_TILE),  # fused gate|up: one expert past a full tile, tails, an empty one
    (1100, 8, 12, 4, 2, "random", 0),  # the automatic tile (1024) fused: every expert in one tail tile
]


@pytest.mark.parametrize("n,h,f,e,k,routing,tile", CASES)
def test_dispatch_matches_dense(n, h, f, e, k, routing, tile):
    x, ws, weights, ids = _case(n * 131 + e + k, n, h, f, e, k, routing)
    if n >= 300:  # the fused cases: check that they really take the fused path
        assert tile_levels(tile, n * k, num_experts=e)[0] >= FUSE_MIN_TILE
    _check(lambda *a: moe_dispatch(*a, tile), x, ws, weights, ids)


def test_dispatch_gather_still_matches_dense():
    x, ws, weights, ids = _case(3, 30, 8, 12, 16, 2, "skewed")
    _check(moe_dispatch_gather, x, ws, weights, ids)


def test_forward_only_and_bf16():
    x, ws, weights, ids = _case(5, 33, 16, 16, 8, 2, "random")
    want = moe_dense(x, weights, ids, *ws)
    got = jax.jit(moe_dispatch, static_argnums=6)(x, weights, ids, *ws, 16)  # primal only: g, u are not kept
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    xb, wsb = x.astype(jnp.bfloat16), tuple(w.astype(jnp.bfloat16) for w in ws)
    got = moe_dispatch(xb, weights, ids, *wsb, 16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0.05, atol=0.05)
    grads = jax.grad(lambda *w: jnp.sum(moe_dispatch(xb, weights, ids, *w, 16)), argnums=(0, 1, 2))(*wsb)
    assert all(gr.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(gr.astype(jnp.float32)))) for gr in grads)


def test_tile_ladder_covers_every_remainder():
    for tile, m in ((128, 4096), (64, 100), (24, 1000), (8, 50), (128, 5), (0, 3)):
        levels = tile_levels(tile, m)
        big, tails = levels[0], levels[1:]
        assert big == max(1, min(tile or 128, m)) and tails[-1] == big and list(tails) == sorted(set(tails))
        steps = np.diff((0, *tails))
        assert all(st <= max(8, t // 4) for st, t in zip(steps, tails)), levels  # steps of <= 8 rows or 25%
        for rem in range(1, big + 1):  # the tail tile of an expert holds 1..T rows: smallest size >= rem
            i = next(i for i, t in enumerate(tails) if t >= rem)
            assert tails[i] - rem < steps[i], (tile, rem, tails[i])


def test_auto_tile_holds_a_typical_expert_in_one_tile():
    for m, e in ((4096, 8), (4096, 16), (4096, 64), (512, 8), (10, 4), (1 << 20, 8), (300, 1)):
        t = auto_full_tile(m, e)
        assert t & (t - 1) == 0 and DEFAULT_TILE <= t <= MAX_AUTO_TILE, (m, e, t)
        assert t >= min(2 * m / e, MAX_AUTO_TILE), (m, e, t)  # twice the mean group fits in one tile
        assert t == DEFAULT_TILE or t / 2 < 2 * m / e, (m, e, t)  # and no larger than needed
    assert auto_full_tile(4096, 8) == 1024 and auto_full_tile(4096, 16) == 512 and auto_full_tile(64, 8) == 128
    assert tile_levels(0, 4096, num_experts=8)[0] == 1024 and tile_levels(0, 100, num_experts=8)[0] == 100


def test_permute_and_combine_are_gathers_with_exact_transposes():
    rng = np.random.default_rng(0)
    n, k, e, h = 11, 3, 5, 4
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e, size=k, replace=False) for _ in range(n)]), jnp.int32)
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    meta = group_metadata(ids, e)
    np.testing.assert_array_equal(np.asarray(meta.inv)[np.asarray(meta.order)], np.arange(n * k))
    np.testing.assert_array_equal(meta.sizes, np.bincount(np.asarray(ids).ravel(), minlength=e))
    ys = jnp.asarray(rng.normal(size=(n * k, h)), jnp.float32)

    def ref_permute(x):
        return x[meta.order // k]

    def ref_combine(ys, w):
        return jnp.einsum("nkh,nk->nh", ys[meta.inv].reshape(n, k, h), w)

    for fn, ref, args in (
        (lambda x: permute(x, meta.order, meta.inv, k), ref_permute, (x,)),
        (lambda ys, w: combine(ys, w, meta.order, meta.inv), ref_combine, (ys, w)),
    ):
        out, vjp = jax.vjp(fn, *args)
        ref_out, ref_vjp = jax.vjp(ref, *args)
        np.testing.assert_allclose(out, ref_out, rtol=1e-6)
        ct = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
        for a, b in zip(vjp(ct), ref_vjp(ct)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dense_oracle_matches_per_token_reference():
    """moe_dense (broadcast to canonical batched matmuls) against a per-token NumPy loop over the chosen experts."""
    x, (wg, wu, wd), weights, ids = _case(7, 16, 16, 24, 8, 2, "skewed")
    got = np.asarray(jax.jit(moe_dense)(x, weights, ids, wg, wu, wd))
    xn, wgn, wun, wdn, wn, idn = map(np.asarray, (x, wg, wu, wd, weights, ids))
    ref = np.zeros_like(xn)
    for n in range(xn.shape[0]):
        for j in range(idn.shape[1]):
            e = idn[n, j]
            g, u = xn[n] @ wgn[e], xn[n] @ wun[e]
            ref[n] += wn[n, j] * ((g / (1 + np.exp(-g)) * u) @ wdn[e])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
