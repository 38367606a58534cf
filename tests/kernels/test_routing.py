"""Router (softmax + top-k) and expert metadata (counting sort) kernels vs their jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_kernels.routing import expert_metadata, expert_metadata_ref, topk_route, topk_route_ref


def assert_close(a, b, rtol=1e-5, atol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=0, atol=atol + rtol * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize(
    "t,e,k,norm",
    [(13, 8, 6, True), (70, 5, 1, True), (7, 8, 2, False)],
)
def test_topk_route_matches_reference(t, e, k, norm):
    logits = jax.random.normal(jax.random.PRNGKey(t * 100 + e), (t, e)) * 2.0
    coef = jax.random.normal(jax.random.PRNGKey(1), (t, k))  # a non-trivial cotangent (sum of weights may be 1)

    def loss(fn, x):
        w, ids = fn(x)
        return jnp.sum(w * coef), (w, ids)

    f = jax.jit(jax.value_and_grad(lambda x: loss(lambda y: topk_route(y, k, norm, block_tokens=8), x), has_aux=True))
    fr = jax.jit(jax.value_and_grad(lambda x: loss(lambda y: topk_route_ref(y, k, norm), x), has_aux=True))
    (_, (w, ids)), g = f(logits)
    (_, (wr, idsr)), gr = fr(logits)
    assert ids.dtype == jnp.int32 and w.dtype == jnp.float32
    np.testing.assert_array_equal(ids, idsr)
    assert_close(w, wr)
    assert_close(g, gr)
    if k > 1 and norm:
        assert_close(jnp.sum(w, -1), jnp.ones(t))


def test_topk_route_ties_pick_lowest_expert():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 1.0, 2.0], [0.0] * 8, [5.0, 5.0, -1.0, 5.0, 2.0, 2.0, 2.0, 2.0]])
    for k in (1, 3, 6):
        w, ids = topk_route(logits, k, True)
        wr, idsr = topk_route_ref(logits, k, True)
        np.testing.assert_array_equal(ids, idsr)
        assert_close(w, wr)


def _ids(kind, t, k, e, seed):
    key = jax.random.PRNGKey(seed)
    if kind == "random":  # distinct experts per token, like top-k
        return jnp.argsort(jax.random.uniform(key, (t, e)), axis=1)[:, :k].astype(jnp.int32)
    if kind == "empty":  # only experts {1, 4, 6}: the others are empty, including the first and the last
        return jnp.array([1, 4, 6], jnp.int32)[jax.random.randint(key, (t, k), 0, 3)]
    if kind == "one":  # every assignment to expert 5
        return jnp.full((t, k), 5, jnp.int32)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,t,k,block",
    [("random", 13, 6, 8), ("random", 37, 1, 128), ("empty", 21, 6, 16), ("one", 10, 6, 8)],
)
def test_expert_metadata_exact(kind, t, k, block):
    e = 8
    ids = _ids(kind, t, k, e, seed=t + k)
    meta = jax.jit(lambda i: expert_metadata(i, e, block_assignments=block))(ids)
    ref = expert_metadata_ref(ids, e)
    for name, a, b in zip(meta._fields, meta, ref):
        assert a.dtype == jnp.int32, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    # the invariants the other kernels rely on
    flat = np.asarray(ids).reshape(-1)
    srt = np.asarray(meta.sort_idx)
    assert sorted(srt.tolist()) == list(range(t * k))
    np.testing.assert_array_equal(np.asarray(meta.inv_idx)[srt], np.arange(t * k))
    assert np.all(np.diff(flat[srt]) >= 0)
    assert int(meta.group_offsets[-1]) == t * k
