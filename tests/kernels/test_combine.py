"""permute / unpermute_combine kernels (and their custom_vjps) vs the jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_kernels.combine import permute, permute_ref, unpermute_combine, unpermute_combine_ref
from ring_kernels.routing import expert_metadata_ref


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol + rtol * max(1.0, float(np.max(np.abs(b)))))


# (T, H, k, ids kind); E = 8 throughout.  rows=8 / cols=16 tiles: T*k and H are not multiples of them.
@pytest.mark.parametrize("t,h,k,kind", [(13, 24, 6, "random"), (11, 40, 1, "one")])
def test_permute_and_combine_forward_and_gradients(t, h, k, kind):
    e = 8
    ks = jax.random.split(jax.random.PRNGKey(t * h + k), 5)
    if kind == "one":
        ids = jnp.full((t, k), 3, jnp.int32)
    else:
        ids = jnp.argsort(jax.random.uniform(ks[0], (t, e)), axis=1)[:, :k].astype(jnp.int32)
    meta = expert_metadata_ref(ids, e)
    x = jax.random.normal(ks[1], (t, h))
    w = jax.random.uniform(ks[2], (t, k))
    y = jax.random.normal(ks[3], (t * k, h))
    cx = jax.random.normal(ks[4], (t * k, h))
    cy = jax.random.normal(ks[0], (t, h))

    def both(perm, comb):
        def loss(x, y, w):
            xs = perm(x)
            out = comb(y, w)
            return jnp.sum(xs * cx) + jnp.sum(out * cy), (xs, out)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, y, w)

    (_, (xs, out)), grads = both(
        lambda x: permute(x, meta, k, rows=8, cols=16), lambda y, w: unpermute_combine(y, meta, w, rows=8, cols=16)
    )
    (_, (xsr, outr)), gradsr = both(lambda x: permute_ref(x, meta, k), lambda y, w: unpermute_combine_ref(y, meta, w))
    np.testing.assert_array_equal(xs, xsr)  # a pure gather: bit-exact
    assert_close(out, outr)
    for g, gr in zip(grads, gradsr):
        assert_close(g, gr)


def test_combine_bf16_accumulates_in_float32():
    t, h, k, e = 6, 16, 6, 8
    ids = jnp.tile(jnp.arange(k, dtype=jnp.int32)[None], (t, 1))
    meta = expert_metadata_ref(ids, e)
    y = jax.random.normal(jax.random.PRNGKey(0), (t * k, h)).astype(jnp.bfloat16)
    w = jax.random.uniform(jax.random.PRNGKey(1), (t, k))
    out = unpermute_combine(y, meta, w, rows=8, cols=16)
    ref = unpermute_combine_ref(y, meta, w)  # float32 accumulation, one final rounding
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)
