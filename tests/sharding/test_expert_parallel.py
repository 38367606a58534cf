"""Expert parallelism (ring_jax.model.moe_ep): the MoE block and the whole model under expert meshes agree with one
device (values and gradients, dropless); with a small capacity the dropped assignments match a NumPy oracle."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.model import abstract_model, moe_ep
from ring_jax.model.moe import MoEBlock, moe_dense, route
from ring_jax.sharding import LOGICAL_RULES, ShardingRules, batch_sharding, make_mesh, shard_model, use_rules
from tests.helpers import randomize_np

MESHES = ["data:2,expert:4", "fsdp:2,expert:2,tensor:2"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **TOL)


# ------------------------------------------------------------------------------------------------- the block
def _block_value_and_grad(block, x, mask, mesh=None):
    graphdef, state = nnx.split(block)

    def loss(state, x):
        m = nnx.merge(graphdef, state)
        y, stats = m(x, mask)  # the EP path counts its drops in stats.dropped
        return jnp.sum(jnp.sin(y)) + stats.balance_loss + stats.z_loss, stats.dropped

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        return fn(state, x)
    with jax.set_mesh(mesh):
        shard_model(block, mesh)
        _, state = nnx.split(block)
        return fn(state, jax.device_put(x, batch_sharding(mesh, 3)))


def test_block_matches_single_device():
    cfg = get_preset("tiny", num_experts=8)
    block = randomize_np(nnx.eval_shape(lambda: MoEBlock(cfg, nnx.Rngs(params=0))), seed=3, scale=0.15)
    x = jax.random.normal(jax.random.key(1), (8, 4, cfg.hidden_size), jnp.float32)
    mask = jnp.ones((8, 4), bool).at[:, -1].set(False)
    (ref, inter), ref_g = _block_value_and_grad(block, x, mask)
    assert int(inter) == 0  # one device: the ordinary path, which drops nothing
    for spec in MESHES:
        (v, inter), g = _block_value_and_grad(block, x, mask, make_mesh(spec))
        drops = [int(inter)]
        assert drops == [0], (spec, drops)  # dropless
        with jax.set_mesh(make_mesh(spec)):  # the condition under which the block takes the EP path
            assert moe_ep.expert_parallel_mesh(cfg.num_experts) is not None, spec
        np.testing.assert_allclose(v, ref, **TOL)
        _close(g, ref_g)  # grads w.r.t. the router, experts, shared MLP and the input


def test_config_capacity_factor_reaches_the_block():
    """``ModelConfig.moe_capacity_factor`` sets the EP capacity: a small factor drops (and counts) exactly the
    assignments the standalone capacity path drops; the block's output equals that path's output plus the shared
    MLP."""
    cfg = get_preset("tiny", num_experts=8, moe_capacity_factor=0.5)
    block = randomize_np(nnx.eval_shape(lambda: MoEBlock(cfg, nnx.Rngs(params=0))), seed=3, scale=0.15)
    x = jax.random.normal(jax.random.key(1), (8, 4, cfg.hidden_size), jnp.float32)
    mask = jnp.ones((8, 4), bool)
    mesh = make_mesh("data:2,expert:4")
    (_, inter), _ = _block_value_and_grad(block, x, mask, mesh)
    drops = [int(inter)]
    flat = x.reshape(-1, cfg.hidden_size)
    w, ids, _ = route(flat @ block.gate[...], cfg.num_experts_per_tok, cfg.norm_topk_prob)
    with jax.set_mesh(mesh):
        _, want = jax.jit(lambda *a: moe_ep.moe_expert_parallel(*a, capacity_factor=0.5))(
            flat, w, ids, block.experts_gate[...], block.experts_up[...], block.experts_down[...]
        )
    assert drops == [int(want)] and drops[0] > 0
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        get_preset("tiny", moe_capacity_factor=0.0)


def test_config_platform_and_active_rules_reach_the_block(monkeypatch):
    """The block hands ``moe_expert_parallel`` its config's ``ep_platform`` / ``ep_auto_ragged`` and the rules of the
    enclosing ``use_rules`` (the default rules outside one)."""
    seen = []

    def spy(x, *args, **kw):
        seen.append(kw)
        return jnp.zeros(x.shape, jnp.float32), jnp.zeros((), jnp.int32)

    monkeypatch.setattr(moe_ep, "moe_expert_parallel", spy)
    rules = ShardingRules({**LOGICAL_RULES, "batch": ("data", "expert")})
    cfg = get_preset("tiny", num_experts=8)
    x = jnp.ones((8, 4, cfg.hidden_size), jnp.float32)
    mask = jnp.ones((8, 4), bool)
    with jax.set_mesh(make_mesh("data:2,expert:4")):
        MoEBlock(cfg, nnx.Rngs(params=0))(x, mask)
        with use_rules(rules):
            MoEBlock(cfg.replace(ep_platform="tpu", ep_auto_ragged=False), nnx.Rngs(params=0))(x, mask)
    assert [(kw["platform"], kw["auto_ragged"], kw["rules"].rules["batch"]) for kw in seen] == [
        (None, True, ("data", "fsdp", "expert")),
        ("tpu", False, ("data", "expert")),
    ]
    assert moe_ep.token_axes(make_mesh("data:2,expert:4"), rules) == ("data", "expert")


def test_choose_impl_decides_for_the_given_platform():
    assert moe_ep.choose_impl("auto", None, "tpu") == "ragged"
    assert moe_ep.choose_impl("auto", None, "tpu", auto_ragged=False) == "capacity"
    assert moe_ep.choose_impl("auto", 1.0, "tpu") == "capacity"
    assert moe_ep.choose_impl("auto", None, "cpu") == "capacity"
    assert moe_ep.choose_impl("auto", None) == "capacity"  # this host's backend: cpu
    with pytest.raises(ValueError, match="one of auto, capacity, ragged"):
        moe_ep.choose_impl("nonsense", None)


# ------------------------------------------------------------------------------------------------- capacity
def _oracle(x, w, ids, wg, wu, wd, shards, cap):
    """NumPy: contiguous token shards; within each (shard, expert) the first ``cap`` assignments in slot-major order
    (all first choices, then second choices, ...) are kept.  Returns (output float64, dropped count)."""
    x, w, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, w, wg, wu, wd))
    ids = np.asarray(ids)
    n, k = ids.shape
    per = -(-n // shards)
    out = np.zeros_like(x)
    dropped = 0
    for s in range(shards):
        rows = range(s * per, min(n, (s + 1) * per))
        used = {}
        for j in range(k):
            for i in rows:
                e = int(ids[i, j])
                used[e] = used.get(e, 0) + 1
                if used[e] > cap:
                    dropped += 1
                    continue
                g, u = x[i] @ wg[e], x[i] @ wu[e]
                out[i] += w[i, j] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
    return out, dropped


@pytest.mark.parametrize("spec,n,cf", [("data:2,expert:4", 64, 0.5), ("fsdp:2,expert:2,tensor:2", 61, 0.75)])
def test_capacity_drops_match_oracle(spec, n, cf):
    rng = np.random.default_rng(0)
    h, f, e, k = 8, 8, 8, 2
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    wg, wu, wd = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h)))
    logits = rng.normal(size=(n, e)) + np.linspace(2, 0, e)  # skewed towards low experts: many drops
    w, ids, _ = route(jnp.asarray(logits, jnp.float32), k, True)
    mesh = make_mesh(spec)
    shards = math.prod(dict(mesh.shape)[a] for a in moe_ep.token_axes(mesh))
    cap = moe_ep.capacity(-(-n // shards), k, e, cf)
    want, want_dropped = _oracle(x, w, ids, wg, wu, wd, shards, cap)
    with jax.set_mesh(mesh):
        y, dropped = jax.jit(lambda *a: moe_ep.moe_expert_parallel(*a, capacity_factor=cf))(x, w, ids, wg, wu, wd)
    assert want_dropped > 0
    assert int(dropped) == want_dropped
    np.testing.assert_allclose(np.asarray(y), want, **TOL)


def test_capacity_rule():
    assert moe_ep.capacity(16, 2, 8, None) == 16  # dropless bound: every local token on one expert
    assert moe_ep.capacity(16, 2, 8, 1.0) == 4
    assert moe_ep.capacity(16, 2, 8, 1.1) == 5
    assert moe_ep.capacity(16, 2, 8, 100.0) == 16
    assert moe_ep.capacity(1, 2, 8, 0.01) == 1


# ------------------------------------------------------------------------------------------------- ragged path
@pytest.mark.parametrize("spec", MESHES)
def test_ragged_path_with_emulated_collective(spec):
    """The ragged_all_to_all path's offsets, regrouping, values and gradients, with the collective emulated (the
    real one is not implemented on CPU)."""
    rng = np.random.default_rng(1)
    n, h, f, e, k = 40, 8, 8, 8, 3
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    wg, wu, wd = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h)))
    w, ids, _ = route(jnp.asarray(rng.normal(size=(n, e)), jnp.float32), k, True)

    def loss(fn):
        return lambda x, w, wg, wu, wd: jnp.sum(jnp.sin(fn(x, w, ids, wg, wu, wd)))

    grad = lambda fn: jax.jit(jax.value_and_grad(loss(fn), argnums=range(5)))(x, w, wg, wu, wd)
    ref = grad(moe_dense)
    with jax.set_mesh(make_mesh(spec)):
        got = grad(
            lambda *a: moe_ep.moe_expert_parallel(*a, impl="ragged", ragged_a2a=moe_ep.ragged_all_to_all_emulated)[0]
        )
    _close(got, ref)


# ------------------------------------------------------------------------------------------------- whole model
def _model_loss(graphdef):
    def loss(params, tokens):
        m = nnx.merge(graphdef, params)
        out = m(tokens[:, :-1])
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, tokens[:, 1:]).mean()
        drops = out.moe_dropped
        return ce + 0.01 * out.balance_loss + 0.001 * out.z_loss, drops

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.fixture(scope="module")
def model_reference():
    """Loss and grads of the tiny model on one device (no mesh): computed once for both meshes."""
    cfg = get_preset("tiny")
    tokens = jax.random.randint(jax.random.key(0), (8, 9), 0, cfg.vocab_size)
    graphdef, params = nnx.split(randomize_np(abstract_model(cfg), seed=2))
    (ref, drops), ref_g = _model_loss(graphdef)(params, tokens)
    assert drops.tolist() == [0]  # no mesh: the ordinary path, which drops nothing
    return tokens, ref, ref_g


@pytest.mark.parametrize("spec,remat", [("data:2,expert:4", False), ("fsdp:2,expert:2,tensor:2", True)])
def test_model_loss_and_grads_match_single_device(model_reference, spec, remat):
    tokens, ref, ref_g = model_reference
    cfg = get_preset("tiny", remat=remat)
    model = randomize_np(abstract_model(cfg), seed=2)
    mesh = make_mesh(spec)
    with jax.set_mesh(mesh):
        shard_model(model, mesh)
        graphdef, params = nnx.split(model)
        (v, drops), g = _model_loss(graphdef)(params, jax.device_put(tokens, batch_sharding(mesh)))
    assert [int(d) for d in drops] == [0] * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
    np.testing.assert_allclose(v, ref, **TOL)
    _close(g, ref_g)
