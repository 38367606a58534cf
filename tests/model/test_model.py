"""Model properties: compute paths agree (values and gradients), segment masking, counting, bad inputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ring_jax.config import ConfigError, ModelConfig, get_preset
from ring_jax.hf import CheckpointError, load_pretrained, save_pretrained
from ring_jax.model import abstract_model
from ring_jax.model.moe import MOE_PATHS, moe_capacity, moe_dense, moe_dispatch, moe_path, moe_ragged, route
from tests.helpers import logits, randomize_np


def test_ling_lite_counts_abstractly():
    cfg = get_preset("ling-lite-1.5")
    _, state = nnx.split(abstract_model(cfg))
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    total = sum(int(np.prod(x.shape)) for x in leaves)
    counts = cfg.param_counts()
    assert total == counts["total"]
    assert f"{total / 1e9:.2f}" == "16.80"
    assert f"{counts['active'] / 1e9:.3g}" == "2.75"


def test_small_preset_size():
    total = get_preset("small").param_counts()["total"]
    assert 10e6 <= total <= 40e6


@pytest.mark.parametrize("k,e", [(1, 4), (2, 8), (6, 16)])
def test_moe_paths_agree_values_and_grads(k, e):
    rng = np.random.default_rng(k)
    n, h, f = 37, 16, 24
    x = jnp.asarray(rng.normal(size=(n, h)), jnp.float32)
    wg, wu, wd = (jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in ((e, h, f), (e, h, f), (e, f, h)))
    logits = jnp.asarray(rng.normal(size=(n, e)), jnp.float32)
    weights, ids, _ = route(logits, k, True)
    if e == 8:  # every token on the same experts: one full group, the rest empty
        ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), ids.shape)

    def loss(fn, *a):
        return lambda x, wg, wu, wd, w: jnp.sum(jnp.sin(fn(x, w, ids, wg, wu, wd, *a)))

    def value_and_grad(fn, *a):  # jitted: eager grads compile every op on its own (slow on CPU)
        return jax.jit(jax.value_and_grad(loss(fn, *a), argnums=(0, 1, 2, 3, 4)))(x, wg, wu, wd, weights)

    ref_v, ref_g = value_and_grad(moe_dense)
    # capacity: the default C (fits for k=6 e=16; overflows into the dense fallback for e=8, every token on the
    # same experts), C=8 (falls back for k=1 e=4: groups of ~9) and C >= n (no fallback compiled)
    paths = (
        (moe_dispatch, (8,)),
        (moe_dispatch, (0,)),
        (moe_ragged, ()),
        (moe_capacity, ()),
        (moe_capacity, (8,)),
        (moe_capacity, (64,)),
    )
    for fn, extra in paths:
        v, g = value_and_grad(fn, *extra)
        np.testing.assert_allclose(v, ref_v, rtol=1e-5)
        for a, b in zip(g, ref_g):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_moe_impl_is_named_with_the_known_ones():
    from ring_jax.config import MOE_IMPLS

    assert sorted(MOE_PATHS) == sorted(MOE_IMPLS) and moe_path("ragged") is moe_ragged
    with pytest.raises(ValueError, match="unknown moe_impl 'triton': one of dispatch, ragged, dense, capacity, pallas"):
        moe_path("triton")
    with pytest.raises(ConfigError, match="moe_impl"):
        get_preset("tiny", moe_impl="triton")


def test_router_renormalisation_rule():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
    probs = np.asarray(jax.nn.softmax(logits))
    w, ids, _ = route(logits, 3, True)
    top = np.sort(probs, -1)[:, ::-1][:, :3]
    np.testing.assert_allclose(np.asarray(w), top / top.sum(-1, keepdims=True), rtol=1e-6)
    w1, _, _ = route(logits, 1, True)  # k = 1: never renormalised (upstream rule)
    np.testing.assert_allclose(np.asarray(w1)[:, 0], probs.max(-1), rtol=1e-6)
    wn, _, _ = route(logits, 3, False)
    np.testing.assert_allclose(np.asarray(wn), top, rtol=1e-6)


def test_packed_segments_do_not_attend_across():
    cfg = get_preset("tiny")
    model = randomize_np(abstract_model(cfg), seed=1)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 5), rng.integers(0, cfg.vocab_size, 6)
    packed = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 6 + [0, 0]])
    pos = np.array([list(range(5)) + list(range(6)) + [0, 0]])
    got = logits(model, packed, jnp.asarray(pos), jnp.asarray(seg))[0]

    def alone(doc):
        """The document's logits as the only sequence (default positions and segments).  Zero-padded to the packed
        length, which causal attention makes equivalent, so that both documents share one compiled forward."""
        row = np.zeros(packed.shape, packed.dtype)
        row[0, : len(doc)] = doc
        return logits(model, row)[0, : len(doc)]

    np.testing.assert_allclose(got[:5], alone(a), atol=1e-5)
    np.testing.assert_allclose(got[5:11], alone(b), atol=1e-5)


def test_bfloat16_compute_close_to_float32():
    cfg = get_preset("tiny")
    m32 = randomize_np(abstract_model(cfg), seed=1)
    m16 = abstract_model(cfg.replace(dtype="bfloat16"))
    nnx.update(m16, nnx.state(m32, nnx.Param))
    toks = np.arange(13)[None] % cfg.vocab_size  # 13: the float32 forward of the packed-segments test, compiled once
    l32, l16 = logits(m32, toks), logits(m16, toks)
    assert l16.dtype == np.float32  # logits always float32
    # bf16 rounding can flip a near-tied top-k choice for a token, so compare on average, not at the worst token
    assert np.mean(np.abs(l16 - l32)) < 0.05 * np.mean(np.abs(l32))


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    save_pretrained(randomize_np(abstract_model(get_preset("tiny"))), str(d), dtype="float32")
    return str(d)


def _copy_with(src, dst, mutate):
    os.makedirs(dst)
    for f in os.listdir(src):
        p = os.path.join(src, f)
        if f.endswith(".safetensors"):
            t = load_file(p)
            mutate(t)
            save_file(t, os.path.join(dst, f))
        else:
            with open(p) as a, open(os.path.join(dst, f), "w") as b:
                b.write(a.read())
    return dst


def test_missing_tensor_is_named(saved_tiny, tmp_path):
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    d = _copy_with(saved_tiny, str(tmp_path / "x"), lambda t: t.pop(name))
    # the index still names it, so the shard lookup fails on the tensor itself
    with pytest.raises(Exception, match="experts.2.up_proj"):
        load_pretrained(d)


def test_unexpected_and_misshaped_tensors_are_named(saved_tiny, tmp_path):
    def add(t):
        t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)

    d = _copy_with(saved_tiny, str(tmp_path / "x"), add)
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    idx["weight_map"]["model.layers.0.extra.weight"] = next(iter(idx["weight_map"].values()))
    json.dump(idx, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra.weight"):
        load_pretrained(d)

    def reshape(t):
        t["model.norm.weight"] = np.ones(7, np.float32)

    d2 = _copy_with(saved_tiny, str(tmp_path / "y"), reshape)
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*\(7,\)"):
        load_pretrained(d2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_act", "gelu"),
        ("rope_scaling", {"type": "yarn", "factor": 2.0}),
        ("use_sliding_window", True),
        ("num_key_value_heads", 3),
        ("num_key_value_heads", 0),
    ],
)
def test_config_fields_that_cannot_be_honoured(saved_tiny, tmp_path, field, value):
    d = _copy_with(saved_tiny, str(tmp_path / "x"), lambda t: None)
    c = json.load(open(os.path.join(d, "config.json")))
    c[field] = value
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(ConfigError, match=field):
        load_pretrained(d)


def test_unknown_preset_and_model_type():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf_dict({"model_type": "llama"})
