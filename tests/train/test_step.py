"""Losses, optimizer, the compiled train step (aggregation contract, sharding, non-finite guard) and the loop's
non-finite stop.  Tiny model, tiny batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.model import build_model
from ring_jax.sharding import LOGICAL_RULES, ShardingRules, active_rules, make_mesh
from ring_jax.train.loop import LoopConfig, NonFiniteError, train_loop
from ring_jax.train.losses import LossConfig, chunked_cross_entropy, sft_loss_fn, token_cross_entropy
from ring_jax.train.optim import OptimConfig, cosine_closed_form, decay_mask, make_optimizer, make_schedule
from ring_jax.train.step import (
    abstract_train_state,
    create_train_state,
    global_batch,
    make_train_step,
    split_model,
    train_state_shardings,
)
from tests.helpers import numpy_params


def one_device_mesh():
    return make_mesh("data:1", devices=jax.devices()[:1])


def make_batch(b, t, vocab, seed=0):
    rng = np.random.default_rng(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2 :] = 2  # two packed documents per row
    seg[0, -3:] = 0  # some padding
    pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
    mask = (rng.random((b, t)) < 0.7).astype(np.int32) * (seg != 0)
    return {
        "tokens": rng.integers(0, vocab, (b, t)).astype(np.int32),
        "targets": rng.integers(0, vocab, (b, t)).astype(np.int32),
        "loss_mask": mask.astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
    }


def random_params(cfg, seed=0, scale=0.2):
    """(graphdef, abstract Variables, numpy parameters): shapes from nnx.eval_shape, values from NumPy (norm weights
    around 1), so building a test model compiles nothing."""
    graphdef, pvars, abstract = split_model(nnx.eval_shape(lambda: build_model(cfg)))
    return graphdef, pvars, numpy_params(abstract, seed, scale, noisy_norms=True)


def new_state(params, opt, sh):
    return create_train_state(params, opt, sh)


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny", moe_impl="dense")
    return (cfg, *random_params(cfg, seed=1))


# ------------------------------------------------------------------------------------------------ losses
def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = rng.integers(0, 2, (2, 5))
    total, count = token_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(total), float((nll * mask).sum()), rtol=1e-6)
    assert float(count) == mask.sum()


def test_chunked_cross_entropy_matches_full():
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 7, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 13)), jnp.float32)
    tg = jnp.asarray(rng.integers(0, 13, (2, 7)))
    mk = jnp.asarray(rng.integers(0, 2, (2, 7)))
    full = lambda h, w: token_cross_entropy(jnp.einsum("bth,hv->btv", h, w), tg, mk)[0]  # noqa: E731
    chunk = lambda h, w: chunked_cross_entropy(h, w, tg, mk, 3)[0]  # noqa: E731 (7 = 2 chunks of 3 + padding)
    vg = lambda f: jax.jit(jax.value_and_grad(f, (0, 1)))(h, w)  # noqa: E731
    (vc, gc), (vf, gf) = vg(chunk), vg(full)
    np.testing.assert_allclose(float(vc), float(vf), rtol=1e-6)
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ optimizer
def test_weight_decay_mask(tiny):
    cfg, _, pvars, params = tiny
    mask = decay_mask(pvars)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    shapes = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not flat["['norm']['weight']"] and not flat["['first_layers'][0]['input_layernorm']['weight']"]
    assert not flat["['layers']['input_layernorm']['weight']"]  # stacked [L, H]: still a norm weight
    assert flat["['word_embeddings']"] and flat["['layers']['mlp']['experts_up']"]
    # decayed iff more than one dimension per layer (the stacked layers' leading axis does not count)
    assert all(v == (len(shapes[k]) - k.startswith("['layers']") > 1) for k, v in flat.items())
    # zero gradients: decayed parameters shrink by lr * wd * p, masked ones do not move
    opt, _ = make_optimizer(OptimConfig(lr=0.1, schedule="constant", warmup_steps=0, weight_decay=0.5), 10, mask)
    new = jax.jit(lambda p: optax.apply_updates(p, opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)[0]))(
        params
    )
    np.testing.assert_array_equal(new["norm"]["weight"], params["norm"]["weight"])
    np.testing.assert_allclose(new["lm_head"], params["lm_head"] * (1 - 0.1 * 0.5), rtol=1e-6)


@pytest.mark.parametrize("schedule,warmup", [("cosine", 3), ("cosine", 0), ("constant", 4)])
def test_schedule_closed_form(schedule, warmup):
    cfg = OptimConfig(lr=3e-4, schedule=schedule, warmup_steps=warmup, end_lr_ratio=0.1)
    sched = make_schedule(cfg, 20)
    for t in (0, 1, 2, 3, 4, 10, 19, 20, 25):
        if t < warmup:
            want = 3e-4 * t / warmup
        elif schedule == "constant":
            want = 3e-4
        else:
            d = 20 - warmup
            want = 3e-5 + (3e-4 - 3e-5) * 0.5 * (1 + math.cos(math.pi * min(t - warmup, d) / d))
        assert float(sched(t)) == pytest.approx(want, rel=1e-5, abs=1e-12), t
        assert cosine_closed_form(cfg, 20, t) == pytest.approx(want, rel=1e-12)
    assert OptimConfig(warmup_ratio=0.01).num_warmup(1000) == 10  # Ring-lite: 1% warm-up


# ------------------------------------------------------------------------------------------------ the step
def _oracle(graphdef, params, batch, optimizer):
    """Direct full-batch computation: mean CE over all loss tokens, its gradient, one optimizer update."""

    def loss(p):
        out = nnx.merge(graphdef, p)(batch["tokens"], batch["positions"], batch["segment_ids"])
        s, n = token_cross_entropy(out.logits, batch["targets"], batch["loss_mask"])
        return s / n

    value, grads = jax.value_and_grad(loss)(params)
    upd, _ = optimizer.update(grads, optimizer.init(params), params)
    return value, optax.apply_updates(params, upd)


@pytest.fixture(scope="module")
def oracle(tiny):
    """Plain SGD with lr 1, so the updated parameters ARE params - grads: comparing them checks the accumulated
    gradient tightly (AdamW's first update, ~lr * sign(grad), would hide gradient errors)."""
    cfg, graphdef, pvars, params = tiny
    opt = optax.sgd(1.0)
    batch = make_batch(8, 16, cfg.vocab_size)
    loss, new_params = jax.jit(lambda p, b: _oracle(graphdef, p, b, opt))(params, batch)
    return opt, batch, float(loss), jax.device_get(new_params)


def check_against_oracle(tiny, oracle, mesh, num_micro):
    cfg, graphdef, pvars, params = tiny
    opt, batch, want_loss, want_params = oracle
    sh = train_state_shardings(pvars, abstract_train_state(params, opt), mesh)
    step = make_train_step(
        graphdef,
        sft_loss_fn(LossConfig(alpha_bal=0.0, alpha_z=0.0)),
        opt,
        mesh,
        sh,
        num_micro,
        schedule=optax.constant_schedule(1.0),
    )
    state, met = step(new_state(params, opt, sh), global_batch(batch, mesh))
    assert float(met["loss"]) == pytest.approx(want_loss, rel=2e-6), num_micro
    assert float(met["num_tokens"]) == batch["loss_mask"].sum() == float(met["normalizer"])
    assert float(met["lr"]) == 1.0 and int(met["skipped"]) == 0 and int(state.step) == 1
    assert met["expert_load"].shape == (cfg.num_experts,)
    # k assignments per real token, summed over micro-batches, mean over the MoE layers
    assert float(met["expert_load"].sum()) == cfg.num_experts_per_tok * (batch["segment_ids"] != 0).sum()
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=2e-6),
        jax.device_get(state.params),
        want_params,
    )
    return state


def test_loss_and_update_invariant_to_micro_batches(tiny, oracle):
    # one train-step compile per count: 1 (no split) and 4 (2 rows each, uneven loss tokens, the padded row in the
    # first); 2 ran the same multi-trip accumulation as 4
    for m in (1, 4):
        check_against_oracle(tiny, oracle, one_device_mesh(), m)


def test_sharded_step_matches_one_device(tiny, oracle):
    """(data=2, fsdp=2, expert=2): same loss and update as the single-device oracle; the state stays sharded."""
    state = check_against_oracle(tiny, oracle, make_mesh("data:2,fsdp:2,expert:2"), 1)
    assert state.params["layers"]["mlp"]["experts_up"].sharding.spec[:2] == (None, "expert")  # [layers, E, ...]
    assert state.params["word_embeddings"].sharding.spec[1] == "fsdp"


def test_batch_not_divisible_is_an_error(tiny):
    cfg, graphdef, pvars, params = tiny
    opt, _ = make_optimizer(OptimConfig(), 10)
    mesh = one_device_mesh()
    sh = train_state_shardings(pvars, abstract_train_state(params, opt), mesh)
    step = make_train_step(graphdef, sft_loss_fn(), opt, mesh, sh, 4)
    with pytest.raises(ValueError, match="divisible"):
        step(None, make_batch(6, 8, cfg.vocab_size))


def test_nonfinite_guard_skips_and_loop_stops(tiny):
    cfg, graphdef, pvars, params = tiny
    opt, _ = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0), 10, decay_mask(pvars))
    mesh = one_device_mesh()
    sh = train_state_shardings(pvars, abstract_train_state(params, opt), mesh)
    base = sft_loss_fn(LossConfig())

    def poisoned(model, mb):  # a float batch field that can carry a NaN into the loss
        total, aux = base(model, mb)
        return total + jnp.sum(mb["poison"]), aux

    step = make_train_step(graphdef, poisoned, opt, mesh, sh, 2)
    clean = dict(make_batch(4, 8, cfg.vocab_size), poison=np.zeros((4,), np.float32))
    bad = dict(clean, poison=np.array([0, np.nan, 0, 0], np.float32))
    state = new_state(params, opt, sh)
    before = jax.device_get((state.params, state.opt_state))
    state, met = step(state, global_batch(bad, mesh))
    assert int(met["skipped"]) == 1 and int(met["skipped_total"]) == 1 and int(state.step) == 1
    assert not np.isfinite(float(met["loss"]))
    after = jax.device_get((state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # bit-identical: nothing applied
    state, met = step(state, global_batch(clean, mesh))
    assert int(met["skipped"]) == 0 and int(state.skipped) == 1
    # MoE aux terms: weighted (alpha_bal 1e-5, alpha_z 1e-7), averaged over the 2 micro-batches, added to the loss
    assert float(met["aux_loss"]) == pytest.approx(
        1e-5 * float(met["balance_loss"]) + 1e-7 * float(met["z_loss"]), rel=1e-5
    )
    assert float(met["loss"]) == pytest.approx(float(met["token_loss"]) + float(met["aux_loss"]), rel=1e-6)
    assert not np.array_equal(jax.device_get(state.params["lm_head"]), before[0]["lm_head"])
    # a clean step after a skip resets the count; max_nonfinite consecutive skips stop the loop
    batches = iter([(clean, None), (bad, None), (bad, None), (clean, None)] + [(bad, None)] * 5)
    seen = []
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        train_loop(
            step,
            state,
            batches,
            start_step=0,
            cfg=LoopConfig(total_steps=20, max_nonfinite=3),
            to_device=lambda b: global_batch(b, mesh),
            on_metrics=lambda s, m: seen.append(m["skipped"]),
        )
    assert seen == [0, 1, 1, 0, 1, 1, 1]


def test_step_traces_the_loss_inside_its_rules(tiny):
    """``make_train_step(rules=...)`` traces the loss (and so the model's expert-parallel block) with those rules
    active (lowered only: nothing compiles)."""
    cfg, graphdef, pvars, params = tiny
    rules = ShardingRules(dict(LOGICAL_RULES))
    seen = []

    def loss_fn(model, mb):
        seen.append(active_rules())
        return jnp.sum(mb["loss_mask"]).astype(jnp.float32), {}

    opt, _ = make_optimizer(OptimConfig(), 1)
    mesh = one_device_mesh()
    abstract = abstract_train_state(params, opt)
    step = make_train_step(graphdef, loss_fn, opt, mesh, train_state_shardings(pvars, abstract, mesh), 1, rules=rules)
    step.lower(abstract, {"loss_mask": np.ones((2, 4), np.int32)})
    assert seen and all(r is rules for r in seen)
    assert active_rules() is not rules
