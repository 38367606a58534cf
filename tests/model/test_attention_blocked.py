"""The block-causal attention path (query block i reads keys of blocks <= i only, T == S) gives the values and
gradients of the full path and of a plain where + softmax reference, float32: causal, packed documents, left and right
padding with fully masked rows in early blocks (uniform over ALL keys, as the full path), a fully padded row, and a
mask with a visible key in a later block (run-time fallback to the full path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.model import attention as A

TOL = dict(atol=2e-5, rtol=2e-5)


def _reference(q, k, v, mask):
    """Autodiff of the textbook formula (masked scores -1e30, softmax over all S keys)."""
    h, kvh, d = q.shape[2], k.shape[2], q.shape[3]
    kk, vv = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)
    sc = jnp.where(mask[:, None], jnp.einsum("bthd,bshd->bhts", q / np.sqrt(d), kk), -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(sc, axis=-1), vv)


def _value_and_grads(fn, q, k, v, mask, w):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask)) * w), argnums=(0, 1, 2)))(
        q, k, v
    )


def _masks(t):
    b = 4
    pos = np.broadcast_to(np.arange(t), (b, t)).copy()
    seg = np.ones((b, t), np.int32)
    seg[0, 20:] = 2  # two packed documents, then right padding from 50
    pos[0, 20:] = np.arange(t - 20)
    seg[0, 50:], pos[0, 50:] = 0, 0
    seg[1, 10:], pos[1, 10:] = 0, 0  # padding rows in every block but the first
    seg[2, :30], pos[2, :30] = 0, 0  # left padding (fully masked rows in blocks 0 and 1)
    pos[2, 30:] = np.arange(t - 30)
    seg[3], pos[3] = 0, 0  # a fully padded row
    return jnp.asarray(seg), jnp.asarray(pos)


@pytest.mark.parametrize("case", ["causal", "packed_padded", "later_block_visible"])
def test_blocked_attention_equals_full_and_reference(case, monkeypatch):
    b, t, h, kvh, d, block = 4, 64, 4, 2, 8, 16
    kq, kk, kv, kw = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, kvh, d))
    v = jax.random.normal(kv, (b, t, kvh, d))
    w = jax.random.normal(kw, (b, t, h, d))
    if case == "causal":
        seg = jnp.ones((b, t), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
        seg, pos = _masks(t)
        if case == "later_block_visible":  # positions reversed over three blocks: keys of later blocks visible
            pos = pos.at[0, :40].set(pos[0, :40][::-1])
    mask = A.attention_mask(seg, pos, seg, pos)
    assert A._num_causal_blocks(t, t, block) == t // block
    assert bool(A._upper_blocks_visible(mask, t // block)) == (case == "later_block_visible")

    monkeypatch.setattr(A, "CAUSAL_BLOCK", block)
    blocked = _value_and_grads(A.dot_attention, q, k, v, mask, w)
    out_blocked = A.dot_attention(q, k, v, mask)
    monkeypatch.setattr(A, "CAUSAL_BLOCK", 0)
    full = _value_and_grads(A.dot_attention, q, k, v, mask, w)
    out_full = A.dot_attention(q, k, v, mask)
    ref = _value_and_grads(_reference, q, k, v, mask, w)
    np.testing.assert_allclose(out_blocked, out_full, **TOL)
    np.testing.assert_allclose(out_blocked, _reference(q, k, v, mask), **TOL)
    for x, y, z in zip(jax.tree.leaves(blocked), jax.tree.leaves(full), jax.tree.leaves(ref)):
        np.testing.assert_allclose(x, y, **TOL)
        np.testing.assert_allclose(x, z, **TOL)
    if case != "causal":
        # a fully masked row: the mean of ALL values (not only those of the keys its block reads)
        vm = jnp.repeat(v, h // kvh, axis=2).mean(axis=1)
        np.testing.assert_allclose(out_blocked[3], jnp.broadcast_to(vm[3], (t, h, d)), **TOL)
        np.testing.assert_allclose(out_blocked[2, 0], vm[2], **TOL)
        # keys of later blocks get the fully masked rows' share of the value gradient (here: nothing else)
        assert float(jnp.max(jnp.abs(blocked[1][2][3]))) > 0


def test_block_counts():
    assert A._num_causal_blocks(256, 256, 64) == 4
    assert A._num_causal_blocks(256, 255, 64) == 0  # T != S (decode, chunked attention): full path
    assert A._num_causal_blocks(64, 64, 64) == 0  # a single block: full path
    assert A._num_causal_blocks(100, 100, 64) == 0
    assert A._num_causal_blocks(256, 256, 0) == 0
    assert A._num_causal_blocks(1024, 1024, 64) == 16
    assert A._num_causal_blocks(4096, 4096, 64) == 0  # 64 unrolled blocks: full path (compile time)
