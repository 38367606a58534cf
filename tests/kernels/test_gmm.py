"""Grouped matmul kernels (gmm, tgmm, the visit schedule, the custom_vjp) vs ragged_dot / einsum references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_kernels.gmm import GmmTiling, gmm, gmm_ref, make_schedule, tgmm, tgmm_ref


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol + rtol * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("m,tm", [(37, 8), (64, 16)])
def test_schedule_covers_every_tile_group_pair_once(m, tm):
    rng = np.random.default_rng(m)
    e = 8
    for trial in range(4):
        sizes = rng.multinomial(m - trial, rng.dirichlet(np.ones(e) * 0.5)).astype(np.int32)  # empties likely
        vgroup, tstart, offs = (np.asarray(a) for a in make_schedule(jnp.asarray(sizes), m, tm))
        nt = -(-m // tm)
        assert vgroup.shape == (nt + e - 1,) and tstart.shape == (nt + 1,)
        want = []
        for i in range(nt):
            for g in range(e):
                if max(i * tm, offs[g]) < min((i + 1) * tm, offs[g + 1]):
                    want.append((i, g))
        got = [(i, int(vgroup[v])) for i in range(nt) for v in range(tstart[i], tstart[i + 1])]
        assert got == want
        assert tstart[-1] == len(want) <= nt + e - 1


CASES = {
    # M not a multiple of the tile, empty groups (first, middle, last), rows past sum(sizes) must be zero
    "empties_tail": dict(m=37, k=24, n=40, sizes=[0, 5, 12, 0, 0, 9, 3, 0], tiling=(16, 16, 16)),
    # every row in one expert; a different tile per pass (forward, d_lhs, d_rhs)
    "one_group": dict(
        m=20, k=8, n=24, sizes=[0, 0, 20, 0, 0, 0, 0, 0], tiling=GmmTiling((8, 8, 16), (16, 8, 8), (8, 16, 8))
    ),
    # many small groups: most row tiles straddle a boundary
    "straddle": dict(m=50, k=16, n=8, sizes=[3, 4, 5, 6, 7, 8, 1, 16], tiling=(8, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_gmm_forward_and_gradients(case):
    c = CASES[case]
    m, k, n = c["m"], c["k"], c["n"]
    sizes = jnp.asarray(c["sizes"], jnp.int32)
    e = sizes.shape[0]
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(m), 3)
    lhs = jax.random.normal(k1, (m, k), jnp.float32)
    rhs = jax.random.normal(k2, (e, k, n), jnp.float32)
    cot = jax.random.normal(k3, (m, n), jnp.float32)

    def run(fn):
        def loss(a, b):
            out = fn(a, b)
            return jnp.sum(out * cot), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)

    (_, out), (dl, dr) = run(lambda a, b: gmm(a, b, sizes, tiling=c["tiling"]))
    (_, ref), (dlr, drr) = run(lambda a, b: gmm_ref(a, b, sizes))
    assert out.shape == (m, n) and out.dtype == jnp.float32
    assert_close(out, ref)
    total = int(jnp.sum(sizes))
    assert np.all(np.asarray(out)[total:] == 0)
    assert_close(dl, dlr)
    assert_close(dr, drr)
    empty = np.asarray(sizes) == 0
    assert np.all(np.asarray(dr)[empty] == 0)


def test_tgmm_matches_reference():
    m, k, n = 29, 24, 16
    sizes = jnp.asarray([7, 0, 0, 13, 2, 0, 0, 0], jnp.int32)  # sum 22 < 29: tail rows ignored
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    lhs = jax.random.normal(k1, (m, k))
    dout = jax.random.normal(k2, (m, n))
    out = tgmm(lhs, dout, sizes, tiling=(8, 16, 8))
    ref = tgmm_ref(lhs, dout, sizes)
    assert out.shape == (8, k, n)
    assert_close(out, ref)
    assert np.all(np.asarray(out)[np.asarray(sizes) == 0] == 0)
