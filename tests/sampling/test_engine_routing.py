"""The engine's routing record (rollout routing replay) and its compute dtype: every token the engine fed through
the model carries the experts it was routed to, equal to a full forward's own choice over prompt + response (the
oracle), in chunked prefill and continuous batching too; a bfloat16 sampler over float32 parameters routes some
(token, layer) pairs differently from the float32 trainer (the mismatch routing replay removes)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.model import abstract_model
from ring_jax.rl.mismatch import routing_disagreement
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import SamplingParams
from tests.helpers import randomize_np

CFG = get_preset("tiny", num_hidden_layers=3, first_k_dense_replace=1, num_experts=8, moe_tile=16)


@functools.partial(jax.jit, static_argnums=(0,))
def _own_routing(graphdef, state, tokens):
    out = nnx.merge(graphdef, state)(tokens, return_routing=True)
    return out.routing, jax.nn.log_softmax(out.logits, axis=-1)


@pytest.fixture(scope="module")
def model():
    return nnx.split(randomize_np(abstract_model(CFG), seed=3, scale=0.3))


def _prompts(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(1, CFG.vocab_size, int(rng.integers(3, 20)))) for _ in range(n)]


def _oracle(graphdef, state, comp):
    ids = np.concatenate([comp.prompt_ids, comp.token_ids]).astype(np.int32)
    pad = np.zeros((1, 64), np.int32)
    pad[0, : len(ids)] = ids
    own, logp = _own_routing(graphdef, state, jnp.asarray(pad))
    p = len(comp.prompt_ids)
    raw = np.asarray(logp)[0, p - 1 : len(ids) - 1][np.arange(len(comp.token_ids)), comp.token_ids]
    return np.asarray(own)[0, : len(ids)], raw


@pytest.mark.parametrize("prefill_chunk,num_slots", [(0, 16), (8, 3)])
def test_recorded_routing_is_every_fed_tokens_own_choice(model, prefill_chunk, num_slots):
    """Float32 engine, two scheduling shapes (one prefill call / 8-token prefill chunks with 3 slots refilled
    continuously): the record equals the full forward's routing on every token but the last (never fed: -1)."""
    graphdef, state = model
    eng = SamplingEngine(graphdef, state, num_slots=num_slots, prefill_chunk=prefill_chunk, record_routing=True)
    comps = eng.generate(_prompts(), SamplingParams(max_new_tokens=12, n=2, ignore_eos=True), key=4)
    for c in comps:
        assert c.routing.dtype == np.int8 and c.routing.shape == (len(c.prompt_ids) + len(c.token_ids), 2, 2)
        assert (c.routing[-1] == -1).all()
        own, raw = _oracle(graphdef, state, c)
        np.testing.assert_array_equal(np.sort(c.routing[:-1], -1), np.sort(own[:-1], -1))
        np.testing.assert_allclose(c.raw_logprobs, raw, atol=1e-4)


def test_no_record_unless_asked_and_none_for_a_dense_model(model):
    graphdef, state = model
    comps = SamplingEngine(graphdef, state, num_slots=4).generate(_prompts(2), SamplingParams(max_new_tokens=4))
    assert all(c.routing is None for c in comps)
    dense = nnx.split(randomize_np(abstract_model(get_preset("tiny", num_experts=None)), seed=1))
    with pytest.raises(ValueError, match="no MoE layer"):
        SamplingEngine(*dense, record_routing=True)
    assert SamplingEngine(*dense, record_routing=None).record_routing is False  # auto: nothing to record


def test_bfloat16_sampler_disagrees_with_float32_trainer(model):
    """Same float32 parameters, the sampler computing in bfloat16: its log-probs move off the trainer's and some
    (token, MoE layer) pairs reach another expert set (measured above 0), while a float32 sampler agrees exactly."""
    graphdef, state = model
    sp = SamplingParams(max_new_tokens=24, n=4, ignore_eos=True)
    prompts = _prompts(8, seed=1)
    for dtype, expect_diff in (("float32", False), ("bfloat16", True)):
        eng = SamplingEngine(graphdef, state, num_slots=32, record_routing=True, dtype=dtype)
        comps = eng.generate(prompts, sp, key=2)
        own = [_oracle(graphdef, state, c) for c in comps]
        frac, tok_frac, n = routing_disagreement(
            np.concatenate([o[0] for o in own]), np.concatenate([c.routing for c in comps])
        )
        gap = np.max(np.concatenate([np.abs(o[1] - c.raw_logprobs) for o, c in zip(own, comps)]))
        assert n == sum(len(c.prompt_ids) + len(c.token_ids) - 1 for c in comps)
        if expect_diff:
            assert eng.cfg.dtype == "bfloat16" and frac > 0 and tok_frac >= frac and gap > 1e-3, (frac, gap)
        else:
            assert frac == 0 and gap < 1e-4, (frac, gap)
