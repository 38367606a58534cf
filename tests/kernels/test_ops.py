"""moe_ffn (metadata -> permute -> gmm x3 -> combine) vs the dense per-expert oracle: outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_kernels.gmm import GmmTiling
from ring_kernels.ops import moe_ffn, moe_ffn_ref


def assert_close(a, b, rtol=1e-5, atol=1e-6, err_msg=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape, err_msg)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol + rtol * max(1.0, float(np.max(np.abs(b)))), err_msg=err_msg)


# E = 8, H = 16, F = 24.  "random": k = 6 distinct experts per token, T*k = 66 not a multiple of the row tiles;
# "one": k = 1, every token to expert 6 (seven empty experts, one group spanning every row tile).
@pytest.mark.parametrize(
    "t,k,kind,tiling",
    [
        (11, 6, "random", {"gate_up": (8, 16, 8), "down": (16, 8, 16)}),
        (9, 1, "one", GmmTiling((8, 8, 8), (16, 8, 8), (8, 8, 16))),
    ],
)
def test_moe_ffn_matches_dense_oracle(t, k, kind, tiling):
    h, f, e = 16, 24, 8
    ks = jax.random.split(jax.random.PRNGKey(t + k), 7)
    if kind == "random":
        ids = jnp.argsort(jax.random.uniform(ks[0], (t, e)), axis=1)[:, :k]
    else:
        ids = jnp.full((t, k), 6)
    ids = ids.astype(jnp.int32)
    x = jax.random.normal(ks[1], (t, h))
    w = jax.random.uniform(ks[2], (t, k))
    wg = jax.random.normal(ks[3], (e, h, f)) * 0.3
    wu = jax.random.normal(ks[4], (e, h, f)) * 0.3
    wd = jax.random.normal(ks[5], (e, f, h)) * 0.3
    cot = jax.random.normal(ks[6], (t, h))

    def run(fn):
        def loss(x, w, wg, wu, wd):
            out = fn(x, ids, w, wg, wu, wd)
            return jnp.sum(out * cot), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, w, wg, wu, wd)

    (_, out), grads = run(lambda *a: moe_ffn(*a, tiling=tiling))
    (_, ref), grads_ref = run(moe_ffn_ref)
    assert out.shape == (t, h) and out.dtype == x.dtype
    assert_close(out, ref)
    for name, g, gr in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads, grads_ref):
        assert_close(g, gr, err_msg=name)
    unused = np.setdiff1d(np.arange(e), np.asarray(ids))
    for g in grads[2:]:
        assert np.all(np.asarray(g)[unused] == 0)  # experts nobody routed to get exactly zero gradient
