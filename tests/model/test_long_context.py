"""Long-sequence memory knobs change memory, not numerics: chunked attention (``attn_chunk``) and the chunked routed
experts (``moe_chunk``) give the values and gradients of the unchunked model (float32), with packing, padding, a
length the chunk does not divide, and under an expert-parallel mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.model import abstract_model
from ring_jax.model.attention import attention_mask, chunked_attention, dot_attention
from ring_jax.model.moe import MoEBlock
from ring_jax.sharding import batch_sharding, make_mesh, shard_model
from tests.helpers import randomize_np

TOL = dict(atol=2e-5, rtol=2e-5)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


def _packed(b, t):
    """Two documents per row, then padding (segment 0) in the last 3 positions."""
    cut = t // 2
    seg = np.where(np.arange(t) < cut, 1, 2)
    seg[-3:] = 0
    pos = np.where(np.arange(t) < cut, np.arange(t), np.arange(t) - cut)
    return (jnp.asarray(np.broadcast_to(seg, (b, t)), jnp.int32), jnp.asarray(np.broadcast_to(pos, (b, t)), jnp.int32))


@pytest.mark.parametrize("t,chunk", [(16, 4), (13, 5)])
def test_chunked_attention_equals_full(t, chunk):
    b, h, kvh, d = 2, 4, 2, 8
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, kvh, d))
    v = jax.random.normal(kv, (b, t, kvh, d))
    seg, pos = _packed(b, t)
    w = jax.random.normal(kg, (b, t, h, d))

    def full(q, k, v):
        return jnp.sum(jnp.sin(dot_attention(q, k, v, attention_mask(seg, pos, seg, pos))) * w)

    def chunked(q, k, v):
        return jnp.sum(jnp.sin(chunked_attention(q, k, v, seg, pos, seg, pos, chunk)) * w)

    np.testing.assert_allclose(
        chunked_attention(q, k, v, seg, pos, seg, pos, chunk),
        dot_attention(q, k, v, attention_mask(seg, pos, seg, pos)),
        **TOL,
    )
    ref = jax.jit(jax.value_and_grad(full, argnums=(0, 1, 2)))(q, k, v)
    got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2)))(q, k, v)
    _close(got, ref)


def _model_loss(graphdef):
    def loss(params, tokens, seg, pos):
        out = nnx.merge(graphdef, params)(tokens, pos, seg)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * (seg[:, 1:] != 0)) + 0.01 * out.balance_loss + 0.001 * out.z_loss

    return jax.jit(jax.value_and_grad(loss))


def test_model_with_chunks_equals_model_without():
    """attn_chunk and moe_chunk on the tiny model (dispatch MoE path, remat on): same loss and gradients."""
    b, t = 2, 16
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, 128)
    seg, pos = _packed(b, t)
    results = []
    for over in ({}, {"attn_chunk": 4, "moe_chunk": 8}):
        cfg = get_preset("tiny", remat=True, **over)
        graphdef, params = nnx.split(randomize_np(abstract_model(cfg), seed=2))
        results.append(_model_loss(graphdef)(params, tokens, seg, pos))
    _close(results[1], results[0])


def test_moe_chunk_under_expert_parallel_mesh():
    """The chunked routed experts inside an expert-parallel mesh (data:2, expert:4) against one device unchunked."""
    x = jax.random.normal(jax.random.key(1), (8, 8, 32), jnp.float32)
    mask = jnp.ones((8, 8), bool).at[:, -1].set(False)

    def value_and_grad(cfg, mesh=None):
        block = randomize_np(nnx.eval_shape(lambda: MoEBlock(cfg, nnx.Rngs(params=0))), seed=3, scale=0.15)

        def loss(state, x):
            y, stats = nnx.merge(graphdef, state)(x, mask)
            return jnp.sum(jnp.sin(y)) + stats.balance_loss + stats.z_loss

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        if mesh is None:
            graphdef, state = nnx.split(block)
            return fn(state, x)
        with jax.set_mesh(mesh):
            shard_model(block, mesh)
            graphdef, state = nnx.split(block)
            return fn(state, jax.device_put(x, batch_sharding(mesh, 3)))

    ref = value_and_grad(get_preset("tiny", num_experts=8))
    got = value_and_grad(get_preset("tiny", num_experts=8, moe_chunk=2), make_mesh("data:2,expert:4"))
    _close(got, ref)


def test_negative_chunk_is_a_config_error():
    with pytest.raises(ValueError, match="attn_chunk"):
        get_preset("tiny", attn_chunk=-1)


def test_chunked_token_logprobs_equal_full():
    """RL log-probs and entropy from logits made a chunk of positions at a time (T not a multiple of the chunk)."""
    from ring_jax.rl.losses import chunked_token_logprobs, token_logprobs

    kh, kw, kt, kc = jax.random.split(jax.random.key(2), 4)
    hidden = jax.random.normal(kh, (2, 11, 8))
    w = jax.random.normal(kw, (8, 32))
    targets = jax.random.randint(kt, (2, 11), 0, 32)
    c = jax.random.normal(kc, (2, 2, 11))

    def loss(fn):
        return lambda h, w: sum(jnp.sum(a * b) for a, b in zip(fn(h, w), c))

    full = loss(lambda h, w: token_logprobs(jnp.einsum("bth,hv->btv", h, w), targets))
    chunked = loss(lambda h, w: chunked_token_logprobs(h, w, targets, 4))
    _close(jax.value_and_grad(chunked, argnums=(0, 1))(hidden, w), jax.value_and_grad(full, argnums=(0, 1))(hidden, w))
