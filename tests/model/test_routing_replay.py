"""Rollout routing replay in the model: with recorded expert ids, every MoE compute path (dispatch, dense,
capacity, ragged, Pallas, expert-parallel) gives the forward of an independent NumPy model whose routing is forced to
those ids (tests/numpy_reference.py, float64); gate weights still come from the trainer's router, so the router
is trained; replaying the model's own choice is the plain forward."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.hf import save_pretrained
from ring_jax.model import abstract_model
from ring_jax.sampling.device import graphdef_of
from ring_jax.sharding import batch_sharding, make_mesh, shard_model
from tests import numpy_reference as ref
from tests.helpers import randomize_np

# two MoE layers after a dense one, 8 experts top-2 (dense first layer: the replay indexes MoE layers only)
CFG = get_preset("tiny", num_hidden_layers=3, first_k_dense_replace=1, num_experts=8, moe_tile=16)
B, T = 2, 8


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, tokens, routing):
    out = nnx.merge(graphdef, state)(tokens, routing=routing, return_routing=True)
    return out.logits, out.routing


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(state, tokens, forced ids with some unrecorded rows, NumPy logits forced / unforced)."""
    model = randomize_np(abstract_model(CFG), seed=7, scale=0.3)
    toks = np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T))
    out = save_pretrained(model, str(tmp_path_factory.mktemp("hf")), dtype="float32")
    c = json.load(open(os.path.join(out, "config.json")))
    sd = ref.load_state_dict(out)
    rng = np.random.default_rng(1)
    n_moe, k = CFG.num_hidden_layers - CFG.num_first_layers, CFG.num_experts_per_tok
    forced = np.stack(
        [[[rng.permutation(CFG.num_experts)[:k] for _ in range(n_moe)] for _ in range(T)] for _ in range(B)]
    ).astype(np.int8)
    forced[0, 2] = -1  # unrecorded tokens route by their own choice
    forced[1, -1] = -1
    want = ref.forward(c, sd, toks, forced_ids=forced)
    plain = ref.forward(c, sd, toks)
    assert np.max(np.abs(want - plain)) > 1e-2  # the forced routing changes the model: the test has teeth
    return nnx.split(model)[1], toks, forced, want, plain


@pytest.mark.parametrize("impl", ["dispatch", "dense", "capacity", "ragged", "pallas"])
def test_every_path_honours_the_replay(case, impl):
    state, toks, forced, want, plain = case
    gd = graphdef_of(CFG.replace(moe_impl=impl))
    got, own = _forward(gd, state, jnp.asarray(toks), jnp.asarray(forced))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)
    free, _ = _forward(gd, state, jnp.asarray(toks), None)
    np.testing.assert_allclose(np.asarray(free), plain, atol=2e-4)
    # Output.routing is the router's own choice even under a replay (what the mismatch metrics compare): in the first
    # MoE layer, whose input the replay has not changed yet, it is the unreplayed forward's choice
    assert own.shape == (B, T, 2, 2) and own.dtype == jnp.int32
    _, own_free = _forward(gd, state, jnp.asarray(toks), None)
    np.testing.assert_array_equal(np.asarray(own)[:, :, 0], np.asarray(own_free)[:, :, 0])
    assert np.any(np.asarray(own)[:, :, 0] != forced[:, :, 0])


def test_expert_parallel_path_honours_the_replay(case):
    """data:2, expert:4: the MoE block takes moe_ep's path; the replay still decides the experts."""
    state, toks, forced, want, _ = case
    toks, forced, want = (np.tile(a, (4,) + (1,) * (a.ndim - 1)) for a in (toks, forced, want))  # 8 rows: 1 a device
    mesh = make_mesh("data:2,expert:4")
    model = nnx.merge(graphdef_of(CFG), jax.tree.map(jnp.asarray, state))
    with jax.set_mesh(mesh):
        shard_model(model, mesh)
        gd, st = nnx.split(model)
        rep = jax.device_put(jnp.asarray(forced), batch_sharding(mesh, 4))
        got, _ = _forward(gd, st, jax.device_put(jnp.asarray(toks), batch_sharding(mesh, 2)), rep)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4)


def test_replaying_the_own_choice_is_the_plain_forward_and_the_router_still_learns(case):
    state, toks, forced, _, _ = case
    gd = graphdef_of(CFG)
    plain, own = _forward(gd, state, jnp.asarray(toks), None)
    same, _ = _forward(gd, state, jnp.asarray(toks), own)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(plain))

    def gate_grad(routing):
        def loss(st):
            return jnp.sum(jnp.sin(nnx.merge(gd, st)(jnp.asarray(toks), routing=routing).logits))

        g = jax.jit(jax.grad(loss))(state)
        return np.asarray(g["layers"]["mlp"]["gate"][...])

    g_forced, g_own, g_plain = gate_grad(jnp.asarray(forced)), gate_grad(own), gate_grad(None)
    np.testing.assert_allclose(g_own, g_plain, atol=1e-6)
    assert np.abs(g_forced).max() > 1e-4  # the gate weights at the replayed ids carry gradient to the router
    assert np.abs(g_forced - g_plain).max() > 1e-4


def test_bad_replay_shape_is_refused(case):
    state, toks, forced, _, _ = case
    with pytest.raises(ValueError, match="moe layers"):
        nnx.merge(graphdef_of(CFG), state)(jnp.asarray(toks), routing=jnp.asarray(forced[:, :, :1]))
