"""The RL step end to end on the tiny model against NumPy oracles, failing rewards, skipped updates, and the
loss-aggregation invariance property."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.rewards.registry import register
from ring_jax.rl.losses import PolicyLossConfig
from ring_jax.rl.step import RewardFailureError, RLConfig, RLStep, make_rl_train_step
from ring_jax.sharding import make_mesh
from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
from ring_jax.train.step import (
    abstract_train_state,
    create_train_state,
    global_batch,
    split_model,
    train_state_shardings,
)
from tests.rl.oracle import policy_loss_and_dlogits
from tests.sampling.models import random_model

# The RL step's compile time is most of this file's cost, and most of that is the dispatch MoE's tile ladder (17 tile
# sizes at the default automatic tile, each a loop forward and backward).  A full tile of 16 rows keeps the dispatch
# path (full tiles, a tail tile, empty experts) with three tile sizes and halves the compile time; the ladder itself
# is checked against the dense oracle in tests/model/test_grouped_xla.py, the default tile end to end by the CLIs.
CFG = get_preset("tiny", moe_tile=16)


@register("likes_seven", overwrite=True)
def _likes_seven(record, response):
    ids = [int(t) for t in response.split()]
    return float(sum(t == 7 for t in ids)) / max(len(ids), 1)


@register("first_even", overwrite=True)
def _first_even(record, response):
    """1 when the response's first token id is even: about half the samples of a near-uniform model succeed, so
    almost every group of 4 has a non-zero advantage."""
    ids = response.split()
    return float(bool(ids) and int(ids[0]) % 2 == 0)


def _setup(mesh, num_micro=1, lr=1e-2, seed=0, sgd=None, rl=None):
    """(graphdef, state, RL train step) of the tiny model; ``sgd``: plain SGD with that learning rate instead of
    AdamW, so the update is minus lr times the gradient (Adam's first step is ~sign(g), which hides nothing)."""
    model = random_model(CFG, seed=seed + 1, scale=0.1)  # NumPy values: building it compiles nothing
    graphdef, pvars, params = split_model(model)
    opt, sched = make_optimizer(
        OptimConfig(lr=lr, schedule="constant", warmup_steps=0, clip_norm=0.0, weight_decay=0.0), 10, decay_mask(pvars)
    )
    if sgd is not None:
        opt, sched = optax.sgd(sgd), None
    sh = train_state_shardings(pvars, abstract_train_state(params, opt), mesh)
    state = create_train_state(params, opt, sh)
    step = make_rl_train_step(graphdef, rl or RLConfig(), opt, mesh, sh, schedule=sched, num_micro=num_micro)
    return graphdef, state, step


def _recording(step, log):
    """Wrap a train step to keep, per call, the parameters before and after (host copies: the state is donated),
    the batch and the normaliser."""

    def run(state, batch, normaliser):
        before = jax.tree.map(np.array, state.params)
        host = {k: np.array(v) for k, v in batch.items()}
        new, m = step(state, batch, normaliser)
        log.append(
            {"before": before, "batch": host, "phi": float(normaliser), "after": jax.tree.map(np.array, new.params)}
        )
        return new, m

    return run


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, tokens, positions, segment_ids):
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, segment_ids).logits


@functools.partial(jax.jit, static_argnums=0)
def _pullback(graphdef, params, tokens, positions, segment_ids, dlogits):
    """The parameter gradient of sum(dlogits * logits(params)): the oracle's dL/dlogits pulled back."""
    return jax.vjp(lambda p: _logits(graphdef, p, tokens, positions, segment_ids), params)[1](dlogits)[0]


def _logits_np(graphdef, params, batch):
    """float32 logits of the batch's rows (one forward, no split), as NumPy."""
    return np.asarray(
        _logits(graphdef, params, *(jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")))
    )


def _grad_np(graphdef, params, batch, dlogits):
    return _pullback(
        graphdef,
        params,
        *(jnp.asarray(batch[k]) for k in ("tokens", "positions", "segment_ids")),
        jnp.asarray(dlogits, jnp.float32),
    )


def _np_advantages(rewards, groups):
    out = np.zeros(len(rewards))
    for g in set(groups):
        m = np.array(groups) == g
        r = np.asarray(rewards, np.float64)[m]
        out[m] = (r - r.mean()) / (r.std() + 1e-6)
    return out


def test_two_updates_per_rollout_see_exact_budgets_and_match_the_numpy_objective():
    """One rollout feeding two C3PO updates (top-p 0.9 rollout, so the TIS weights are not 1, beta > 0, SGD so an
    update is minus the learning rate times the gradient).  Against independent oracles:
    - each update trains exactly Phi tokens, from disjoint responses, each token at the place the completion puts
      it with the advantage recomputed here from the rewards;
    - the second update's ratios differ from 1 (pi_old is the sampling policy) and its clip acts;
    - each update's loss and parameter gradient equal the NumPy objective (oracle.py: loss and dL/dlogits by hand,
      pulled back through the model), so a clip that acts on the wrong side, a missing TIS weight or a wrong
      normaliser fails."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    lr, phi, eps, beta, ent = 2.0, 40, 0.1, 0.05, 0.01
    rl = RLConfig(
        samples_per_prompt=4,
        budget=phi,
        updates_per_rollout=2,
        max_new_tokens=12,
        seq_len=32,
        num_slots=16,
        top_p=0.9,
        alpha_bal=0.0,
        alpha_z=0.0,
        policy=PolicyLossConfig(clip_eps=eps, beta=beta, alpha_ent=ent),
    )
    graphdef, state, step = _setup(mesh, sgd=lr, rl=rl)
    log = []
    rls = RLStep(
        graphdef,
        _recording(step, log),
        rl,
        encode_prompt=lambda r: r["prompt_ids"],
        decode=lambda ids: " ".join(map(str, ids)),
        ref_params=jax.tree.map(jnp.copy, state.params),
        seed=3,
    )
    records = [{"task": "first_even", "prompt_ids": [3, 4, 5 + i]} for i in range(4)]
    state, m = rls(state, records)
    comps = rls.last_completions
    assert m["updates"] == 2 and len(log) == 2 and m["responses"] == 16
    rewards = [_first_even(None, " ".join(map(str, c.token_ids))) for c in comps]
    adv = _np_advantages(rewards, [c.prompt_index for c in comps])
    used = set()
    for u, rec in enumerate(log, start=1):
        b = rec["batch"]
        assert m[f"update/{u}/tokens"] == phi and rec["phi"] == phi and b["weights"].sum() == phi
        # every segment's trained tokens are a prefix of one completion's response, with its advantage
        for i in range(b["tokens"].shape[0]):
            for s in range(1, b["segment_ids"][i].max() + 1):
                idx = np.nonzero((b["segment_ids"][i] == s) & (b["weights"][i] > 0))[0]
                seq = b["targets"][i, idx]
                match = [
                    k
                    for k, c in enumerate(comps)
                    if k not in used
                    and len(c.token_ids) >= len(seq)
                    and np.array_equal(c.token_ids[: len(seq)], seq)
                    and np.allclose(b["advantages"][i, idx], adv[k], atol=1e-5)
                ]
                assert match, "a trained segment matches no unused completion"
                used.add(match[0])
                np.testing.assert_allclose(b["old_logp"][i, idx], comps[match[0]].raw_logprobs[: len(seq)], atol=1e-6)
        assert np.any(b["advantages"][b["weights"] > 0] != 0)
        assert np.all(b["tis"][b["weights"] > 0] <= rl.tis_cap) and np.any(b["tis"][b["weights"] > 0] < 0.999)
        # the objective and its gradient against the NumPy oracle
        loss, dz = policy_loss_and_dlogits(_logits_np(graphdef, rec["before"], b), b, phi, eps, beta, ent)
        assert m[f"update/{u}/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
        want = _grad_np(graphdef, rec["before"], b, dz)
        got = jax.tree.map(lambda a, c: (a - c) / lr, rec["before"], rec["after"])
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(g, np.asarray(w), atol=2e-5, rtol=2e-3)
    assert abs(m["update/1/ratio_mean"] - 1.0) < 1e-4 and m["update/1/clip_frac"] == 0.0  # pi_theta == pi_old
    assert abs(m["update/2/ratio_mean"] - 1.0) > 1e-3 and m["update/2/clip_frac"] > 0  # the clip acts
    assert m["update/2/approx_kl"] > 1e-4 and m["update/2/ratio_max"] > 1 + eps
    assert m["tokens"] == 2 * phi and m["budget_shortfall"] == 0
    assert m["kept_tokens"] + m["discarded_tokens"] == sum(len(c.token_ids) for c in comps)
    for k in (
        "time/rollout_s",
        "time/reward_s",
        "time/reference_s",
        "time/train_s",
        "reward/first_even/mean",
        "tis/weight_mean",
        "tis/weight_min",
        "tis/weight_max",
        "tis/truncated_frac",
    ):
        assert k in m


def test_failed_rewards_leave_groups_and_budgets_and_abort_past_the_threshold():
    """A reward that raises for some responses: those are kept out of their group's statistics and of the budget
    and counted per task; past max_reward_fail_frac the step raises before touching the state."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    rl = RLConfig(
        samples_per_prompt=4,
        budget=24,
        max_new_tokens=8,
        seq_len=32,
        num_slots=16,
        max_reward_fail_frac=0.9,
        policy=PolicyLossConfig(beta=0.0),
    )
    graphdef, state, step = _setup(mesh, rl=rl)
    log = []
    rls = RLStep(
        graphdef,
        _recording(step, log),
        rl,
        encode_prompt=lambda r: r["prompt_ids"],
        decode=lambda ids: " ".join(map(str, ids)),
        seed=4,
    )

    @register("flaky_even", overwrite=True)
    def _flaky(record, response):  # first_even, but the verifier breaks on some second tokens
        ids = [int(t) for t in response.split()]
        if ids[1] % 6 == 0:
            raise RuntimeError("verifier crashed")
        return float("nan") if ids[1] % 6 == 1 else float(ids[0] % 2 == 0)

    records = [{"task": "flaky_even", "prompt_ids": [3, 4, 5 + i]} for i in range(4)]
    state, m = rls(state, records)
    comps = rls.last_completions
    firsts = np.array([int(c.token_ids[0]) for c in comps])
    failed = np.array([int(c.token_ids[1]) % 6 in (0, 1) for c in comps])
    assert 0 < failed.sum() < len(comps)
    assert m["reward_failed"] == failed.sum() and m["reward_failed/flaky_even"] == failed.sum()
    sel = rls.last_selections[0]
    assert not failed[sel.index].any()  # never in the budget
    ok = ~failed
    rewards = (firsts % 2 == 0).astype(float)
    groups = np.array([c.prompt_index for c in comps])
    want = np.zeros(len(comps))
    for g in set(groups):  # group statistics over the valid responses only
        mm = (groups == g) & ok
        if mm.sum() >= 2:
            want[mm] = (rewards[mm] - rewards[mm].mean()) / (rewards[mm].std() + 1e-6)
    assert log and np.any(want[sel.index] != 0)
    b = log[0]["batch"]
    got = set(np.round(b["advantages"][b["weights"] > 0].astype(np.float64), 3).tolist())
    assert got == set(np.round(want[sel.index], 3).tolist())
    strict = dataclasses.replace(rl, max_reward_fail_frac=0.05)
    rls2 = RLStep(
        graphdef,
        step,
        strict,
        encode_prompt=lambda r: r["prompt_ids"],
        decode=lambda ids: " ".join(map(str, ids)),
        seed=4,
    )
    before = int(state.step)
    with pytest.raises(RewardFailureError, match="flaky_even"):
        rls2(state, records)
    assert int(state.step) == before  # not donated, not advanced


def test_update_without_signal_is_skipped():
    """Every reward equal (a task nobody solves): every advantage is 0, so the update is skipped -- parameters and
    optimizer state unchanged, the step counted -- and taken when the user asks for it (skip_no_signal=False)."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    rl = RLConfig(
        samples_per_prompt=4, budget=24, max_new_tokens=8, seq_len=32, num_slots=16, policy=PolicyLossConfig(beta=0.0)
    )
    graphdef, state, step = _setup(mesh, rl=rl)

    @register("never", overwrite=True)
    def _never(record, response):
        return 0.0

    records = [{"task": "never", "prompt_ids": [3, 4, 5 + i]} for i in range(4)]
    before = jax.tree.map(np.array, state.params)
    rls = RLStep(
        graphdef, step, rl, encode_prompt=lambda r: r["prompt_ids"], decode=lambda ids: " ".join(map(str, ids))
    )
    state, m = rls(state, records)
    assert m["skipped_no_signal"] == 1 and m["updates"] == 0 and int(state.step) == 1 and int(state.skipped) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    rls = RLStep(
        graphdef,
        step,
        dataclasses.replace(rl, skip_no_signal=False),
        encode_prompt=lambda r: r["prompt_ids"],
        decode=lambda ids: " ".join(map(str, ids)),
    )
    state, m = rls(state, records)
    assert m["updates"] == 1 and m["skipped_no_signal"] == 0 and int(state.step) == 2
    assert any(
        not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))
    )


def _rows(seed, n_rows=16, t=16):
    rng = np.random.default_rng(seed)
    seg = np.ones((n_rows, t), np.int32)
    seg[:, t // 2 :] = 2
    pos = np.concatenate([np.arange(t // 2), np.arange(t // 2)])[None].repeat(n_rows, 0).astype(np.int32)
    w = (rng.random((n_rows, t)) > 0.4).astype(np.float32)
    return {
        "tokens": rng.integers(0, CFG.vocab_size, (n_rows, t)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (n_rows, t)).astype(np.int32),
        "positions": pos,
        "segment_ids": seg,
        "weights": w,
        "old_logp": (rng.normal(size=(n_rows, t)) * 0.1 - 4.8).astype(np.float32),
        "advantages": rng.normal(size=(n_rows, t)).astype(np.float32),
        "ref_logp": (rng.normal(size=(n_rows, t)) * 0.1 - 4.8).astype(np.float32),
    }


_REF = {}
_SPLIT_RL = RLConfig(alpha_bal=0.0, alpha_z=0.0)  # the objective is then the policy loss alone, as the oracle's


# Each split costs one RL-step compile (~10 s on the 2-core box).  Two splits cover every axis against the oracle:
# 4 micro-batches x 4 data-parallel devices (1 row per device per micro-batch, uneven token counts: the weights are
# random) and 2 micro-batches over data:2 x fsdp:2 (sharded parameters and optimizer state); a per-micro-batch or
# per-device mean instead of the sum over Phi, a missing psum or an FSDP gather bug moves the loss or the update.
# (It drew 4 of the 12 (micro-batches, mesh) pairs at random before, which could include the unsplit (1, data:1).)
@pytest.mark.parametrize("num_micro,mesh_spec", [(4, "data:4"), (2, "data:2,fsdp:2")])
def test_loss_and_update_independent_of_split(num_micro, mesh_spec):
    """Property: for a fixed selected batch (fixed weights, constant normaliser Phi) the loss and the updated
    parameters do not depend on how rows are split into micro-batches or over data-parallel devices, and they are
    the NumPy objective over the whole selected set divided by Phi (oracle.py) and one SGD step of its gradient."""
    rows = _rows(0)
    phi = float(rows["weights"].sum())
    if "ref" not in _REF:
        graphdef, s0, _ = _setup(make_mesh("data:1", devices=jax.devices()[:1]), 1, sgd=1.0, rl=_SPLIT_RL)
        p0 = jax.tree.map(np.array, s0.params)
        pol = _SPLIT_RL.policy
        loss, dz = policy_loss_and_dlogits(
            _logits_np(graphdef, p0, rows), rows, phi, pol.clip_eps, pol.beta, pol.alpha_ent
        )
        grad = _grad_np(graphdef, p0, rows, dz)
        _REF["ref"] = (loss, jax.tree.map(lambda p, g: p - np.asarray(g), p0, grad))
    loss_np, p_np = _REF["ref"]
    n = int(np.prod([int(p.split(":")[1]) for p in mesh_spec.split(",")]))
    mesh = make_mesh(mesh_spec, devices=jax.devices()[:n])
    _, s, stp = _setup(mesh, num_micro, sgd=1.0, rl=_SPLIT_RL)
    s, m = stp(s, global_batch(rows, mesh), phi)
    assert float(m["token_loss"]) == pytest.approx(loss_np, rel=1e-5, abs=1e-7)
    assert float(m["normalizer"]) == phi
    for a, b in zip(jax.tree.leaves(p_np), jax.tree.leaves(s.params)):
        np.testing.assert_allclose(np.asarray(b), a, atol=1e-6, rtol=1e-5)  # params - 1.0 * gradient


def test_c3po_steps_raise_the_reward():
    """The whole loop optimises what it is told to: a few C3PO steps (rollout -> reward -> GRPO advantages -> budget
    selection -> update) raise the mean reward of a toy task.  Oracle: the reward itself, measured on fresh
    rollouts; a sign error anywhere in advantages, selection, row building or the loss makes it fall instead."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    graphdef, state, step = _setup(mesh, lr=3e-2)
    rl = RLConfig(
        samples_per_prompt=8,
        budget=160,
        max_new_tokens=8,
        seq_len=64,
        num_slots=32,
        binary_reward=False,
        selection_order="informative_first",
        policy=RLConfig().policy.__class__(beta=0.0, alpha_ent=0.0),
    )
    rls = RLStep(
        graphdef, step, rl, encode_prompt=lambda r: r["prompt_ids"], decode=lambda ids: " ".join(map(str, ids)), seed=5
    )
    records = [{"task": "likes_seven", "prompt_ids": [3, 4, 5 + i]} for i in range(4)]
    means = []
    for _ in range(12):
        state, m = rls(state, records)
        means.append(m["reward/likes_seven/mean"])
    # a near-uniform tiny model starts at ~1/128 sevens per token
    assert np.mean(means[:2]) < 0.1, means
    assert np.mean(means[-2:]) > np.mean(means[:2]) + 0.3, means
