"""The stacked decoder layers: one lax.scan against the same parameters unrolled (values and gradients, with and
without rematerialisation under each policy), a program whose size does not grow with depth, and per-layer access
(``model.layer(i)``) against the parameters as one module per layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.model import abstract_model
from tests.helpers import unrolled_params
from tests.sampling.models import random_model

CFG = get_preset("tiny", num_hidden_layers=3, moe_impl="dense")  # a dense first layer + a stack of two MoE layers


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grad(graphdef, state, tokens):
    def loss(s):
        out = nnx.merge(graphdef, s)(tokens)
        return jnp.mean(jnp.sin(out.logits)) + 0.1 * out.balance_loss + 0.01 * out.z_loss

    return jax.value_and_grad(loss)(state)


def _run(cfg, tokens):
    model = random_model(cfg, seed=5, scale=0.2)
    return _loss_and_grad(*nnx.split(model), tokens)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)


@pytest.fixture(scope="module")
def unrolled(tokens):
    return _run(CFG.replace(scan_layers=False), tokens)


# remat with the default policy ("nothing") is compared with and without remat in test_long_context and
# test_expert_parallel; here the scan against the unrolled loop, plain and with a saving policy
@pytest.mark.parametrize("over", [dict(), dict(remat=True, remat_policy="dots")])
def test_scan_equals_unrolled(tokens, unrolled, over):
    (v, g), (v0, g0) = _run(CFG.replace(**over), tokens), unrolled
    assert float(v) == pytest.approx(float(v0), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7), g, g0)


def _hlo_ops(cfg):
    model = abstract_model(cfg)
    g, s = nnx.split(model)
    text = (
        jax.jit(lambda s, t: nnx.merge(g, s)(t).logits.sum())
        .lower(s, jax.ShapeDtypeStruct((2, 8), jnp.int32))
        .as_text()
    )
    return text.count("\n")


def test_program_size_does_not_grow_with_depth():
    """Lowered forward of 2 vs 8 layers: the scanned program is the same size (one loop body), the unrolled one
    holds a copy of the layer per depth."""
    scan = [_hlo_ops(CFG.replace(num_hidden_layers=n)) for n in (2, 8)]
    unroll = [_hlo_ops(CFG.replace(num_hidden_layers=n, scan_layers=False)) for n in (2, 8)]
    assert scan[1] < 1.05 * scan[0], scan
    assert unroll[1] > 2.5 * unroll[0], unroll


def test_layer_gives_each_layers_parameters():
    """model.layer(i) holds exactly the parameters the one-module-per-layer layout had at layers/i."""
    model = random_model(CFG, seed=6)
    by_path = {}
    for path, var, j in unrolled_params(model):
        value = np.asarray(var.get_value())
        by_path[path] = value if j is None else value[j]
    for i in range(CFG.num_hidden_layers):
        layer = model.layer(i)
        for path, var in nnx.iter_graph(layer):
            if isinstance(var, nnx.Param):
                np.testing.assert_array_equal(np.asarray(var.get_value()), by_path[("layers", i) + tuple(path)])
    with pytest.raises(IndexError):
        model.layer(CFG.num_hidden_layers)
