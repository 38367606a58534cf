"""The decode-attention kernel (ring_kernels.decode_attention) against its plain-jnp reference (softmax over every
cache slot), in interpret mode: rows of different live lengths (one block, several, the whole cache), an older
segment inside a row, a traced layer index; and its Pallas -> Triton lowering from this host."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_kernels._common import lowering_target
from ring_kernels.decode_attention import decode_attention, decode_attention_ref


def _case(rng, L=2, B=4, KVH=2, G=3, D=8, S=512, lens=(1, 130, 512, 77)):
    k = jnp.asarray(rng.standard_normal((L, B, KVH, D, S)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, B, KVH, S, D)), jnp.float32)
    lens = np.asarray(lens)
    kseg = (np.arange(S)[None] < lens[:, None]).astype(np.int32)
    if B > 3:
        kseg[3, :10] = 2  # row 3: slots 0-9 belong to another sequence, invisible to its query
    kpos = np.broadcast_to(np.arange(S), (B, S)).astype(np.int32).copy()
    q = jnp.asarray(rng.standard_normal((B, KVH * G, D)), jnp.float32)
    return q, k, v, jnp.ones((B,), jnp.int32), jnp.asarray(lens - 1), jnp.asarray(kseg), jnp.asarray(kpos), lens


@pytest.mark.parametrize("block", [128, 512])
def test_kernel_equals_reference(block):
    q, k, v, qs, qp, kseg, kpos, lens = _case(np.random.default_rng(0))
    fn = jax.jit(lambda layer, *a: decode_attention(*a[:3], layer, *a[3:], block=block, interpret=True))
    for layer in (0, 1):
        got = fn(jnp.int32(layer), q, k, v, qs, qp, kseg, kpos, jnp.asarray(lens))
        want = decode_attention_ref(q, k, v, layer, qs, qp, kseg, kpos)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kernel_reads_only_the_live_blocks():
    """Garbage (NaN) in every slot past a row's length changes nothing: those blocks are never read."""
    q, k, v, qs, qp, kseg, kpos, lens = _case(np.random.default_rng(1), lens=(1, 130, 256, 77))
    dead = jnp.asarray(np.arange(512)[None, :] >= (-(-lens // 128) * 128)[:, None])  # past each row's last block
    k_bad = jnp.where(dead[None, :, None, None, :], jnp.nan, k)
    v_bad = jnp.where(dead[None, :, None, :, None], jnp.nan, v)
    got = decode_attention(q, k_bad, v_bad, 1, qs, qp, kseg, kpos, jnp.asarray(lens), block=128, interpret=True)
    want = decode_attention_ref(q, k, v, 1, qs, qp, kseg, kpos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_kernel_lowers_to_triton():
    q, k, v, qs, qp, kseg, kpos, lens = _case(
        np.random.default_rng(2), L=1, B=2, KVH=1, G=4, D=16, S=256, lens=(3, 200)
    )
    with lowering_target("gpu"):
        text = (
            jax.jit(lambda *a: decode_attention(*a[:3], 0, *a[3:], block=128))
            .trace(q, k, v, qs, qp, kseg, kpos, jnp.asarray(lens))
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
    assert len(re.findall(re.escape("__gpu$xla.gpu.triton"), text)) == 1
