"""Advantages, C3PO selection and the policy loss against independent oracles and properties."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ring_jax.rl.advantages import binarize_rewards, group_advantages
from ring_jax.rl.losses import PolicyLossConfig, policy_loss_sum, token_logprobs, token_weights
from ring_jax.rl.selection import fixed_count, select_budget, select_budgets


def test_group_advantages_oracle():
    rewards = [1, 0, 0, 1, 0.5, 0.5, 0.5, 0.5, 1, 0]
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    adv = group_advantages(rewards, groups)
    for g in set(groups):
        rs = [r for r, gg in zip(rewards, groups) if gg == g]
        mu, sd = statistics.fmean(rs), statistics.pstdev(rs)
        want = [(r - mu) / (sd + 1e-6) for r in rs]
        np.testing.assert_allclose(adv[np.array(groups) == g], want, rtol=1e-5, atol=1e-6)
    assert np.all(adv[4:8] == 0)  # all-equal group: no signal


def test_group_advantages_leave_out_failed_rewards():
    rewards = [1, 0, 0, 0, 1, 1, 0, 0]
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    valid = [True, True, False, False, True, False, False, True]  # group 0: [1, 0]; group 1: [1, 0]
    adv = group_advantages(rewards, groups, valid=valid)
    np.testing.assert_allclose(adv, [1, -1, 0, 0, 1, 0, 0, -1], atol=1e-5)
    adv = group_advantages([1, 0, 1], [0, 0, 0], valid=[True, False, False])  # one valid: no signal
    np.testing.assert_array_equal(adv, [0, 0, 0])


def test_group_advantages_zero_a_group_that_differs_only_by_rounding():
    """A learned reward model's float scores of equal responses: the group's std is ~1e-17, and (R - mean) /
    (std + eps) would give ~1e-11 advantages that count as signal (they would defeat --skip_no_signal).  Such a group
    gets exactly 0; a group with a real spread keeps the GRPO advantages."""
    base = np.float32(0.7)
    noisy = np.array([base, base, np.nextafter(base, np.float32(1)), base], np.float64) * (1 + 1e-16)
    rewards = np.concatenate([noisy, [0.2, 0.9, 0.4, 0.7]])
    groups = [0] * 4 + [1] * 4
    naive = (noisy - noisy.mean()) / (noisy.std() + 1e-6)
    assert 0 < np.abs(naive).max() < 1e-1  # the bug's size: tiny but non-zero
    adv = group_advantages(rewards, groups)
    assert np.count_nonzero(adv[:4]) == 0
    r = rewards[4:]
    np.testing.assert_allclose(adv[4:], (r - r.mean()) / (r.std() + 1e-6), rtol=1e-6)
    # the tolerance scales with the rewards: the same relative spread on rewards of size 1000 is still no signal
    assert np.count_nonzero(group_advantages(1000 * noisy, [0] * 4)) == 0


def test_binarize_rewards_keeps_reward_model_scores():
    r = binarize_rewards(
        [1.0, 0.99, 0.05, 0.0, 0.37, -2.5, 1.0],
        ["countdown", "arithmetic", "countdown", "ifeval", "reward_model", "reward_model", "ifeval"],
    )
    np.testing.assert_array_equal(r, np.float32([1.0, 0.0, 0.0, 0.0, 0.37, -2.5, 1.0]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 50), min_size=1, max_size=40),
    st.integers(1, 400),
    st.sampled_from(["random", "rollout", "shortest_first", "longest_first", "informative_first"]),
    st.integers(0, 3),
)
def test_budget_selection_properties(lengths, budget, order, seed):
    adv = np.random.default_rng(seed + len(lengths)).choice([0.0, 0.0, 1.5, -0.7], len(lengths))
    sel = select_budget(lengths, budget, order, seed, advantages=adv)
    lengths = np.array(lengths)
    assert len(set(sel.index.tolist())) == len(sel.index)  # no response twice
    assert sel.selected_tokens == int(sel.keep.sum())
    pool = int(lengths.sum())
    if pool >= budget:
        assert sel.selected_tokens == budget and sel.shortfall == 0  # exactly Phi tokens
    else:
        assert sel.selected_tokens == pool and sel.shortfall == budget - pool
    assert sel.discarded_tokens == pool - sel.selected_tokens
    if pool == 0:
        assert len(sel.index) == 0
        return
    # greedy: every response but the last is whole, the last is cut only to hit the budget
    np.testing.assert_array_equal(sel.keep[:-1], lengths[sel.index[:-1]])
    assert 0 < sel.keep[-1] <= lengths[sel.index[-1]]
    # the prefix before the last did not yet reach the budget
    assert int(sel.keep[:-1].sum()) < budget
    if order == "shortest_first":
        assert np.all(np.diff(lengths[sel.index]) >= 0)
    if order == "rollout":
        assert np.all(np.diff(sel.index) > 0)
    if order == "informative_first":  # every response with signal is taken before any without
        informative = adv[sel.index] != 0
        assert np.all(np.diff(informative.astype(int)) <= 0)
        nonempty_inf = (adv != 0) & (lengths > 0)
        if not informative.all():
            assert set(np.flatnonzero(nonempty_inf)) <= set(sel.index.tolist())


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=1, max_size=40),
    st.integers(1, 120),
    st.integers(1, 4),
    st.sampled_from(["random", "rollout", "informative_first"]),
    st.integers(0, 3),
)
def test_disjoint_budgets_properties(lengths, budget, num, order, seed):
    rng = np.random.default_rng(seed)
    adv = rng.choice([0.0, 1.0, -1.0], len(lengths))
    eligible = rng.random(len(lengths)) > 0.2
    sels = select_budgets(lengths, budget, num, order, seed, advantages=adv, eligible=eligible)
    lengths = np.array(lengths)
    assert len(sels) == num
    taken = np.concatenate([s.index for s in sels])
    assert len(set(taken.tolist())) == len(taken)  # no response in two updates
    assert eligible[taken].all()
    pool = int(lengths[eligible].sum())
    left = pool
    for s in sels:  # each budget exactly Phi while the eligible pool lasts, in one greedy pass
        assert s.selected_tokens == int(s.keep.sum()) <= budget
        if len(s.index):
            np.testing.assert_array_equal(s.keep[:-1], lengths[s.index[:-1]])
            assert int(s.keep[:-1].sum()) < budget
        assert s.selected_tokens == min(budget, left)
        left -= int(lengths[s.index].sum())
        assert s.shortfall == budget - s.selected_tokens
    assert sels[0].discarded_tokens == int(lengths.sum()) - sum(s.selected_tokens for s in sels)
    one = select_budget(lengths, budget, order, seed, advantages=adv, eligible=eligible)
    np.testing.assert_array_equal(one.index, sels[0].index)  # the first budget is the single-budget selection


def test_fixed_count_parts_are_disjoint():
    lengths = np.arange(1, 21)
    parts = fixed_count(lengths, 6, seed=1, parts=3)
    idx = np.concatenate([p.index for p in parts])
    assert [len(p.index) for p in parts] == [6, 6, 6] and len(set(idx.tolist())) == 18
    assert parts[0].discarded_tokens == int(lengths.sum() - lengths[idx].sum())


def test_selection_is_deterministic_given_seed():
    lengths = np.random.default_rng(0).integers(1, 100, 64)
    a, b = select_budget(lengths, 1000, seed=7), select_budget(lengths, 1000, seed=7)
    np.testing.assert_array_equal(a.index, b.index)
    assert not np.array_equal(a.index, select_budget(lengths, 1000, seed=8).index)
    with pytest.raises(ValueError, match="order"):
        select_budget(lengths, 10, order="fastest")
    with pytest.raises(ValueError, match="advantage"):
        select_budget(lengths, 10, order="informative_first")
    assert fixed_count(lengths, 5)[0].index.shape == (5,)


def _np_loss(logits, targets, old, ref, adv, w, c, tis=1.0):
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    logp = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse
    p = np.exp(logits - lse[..., None])
    ent = -np.sum(p * np.log(p), -1)
    r = np.exp(logp - old)
    pg = tis * np.minimum(r * adv, np.clip(r, 1 - c.clip_eps, 1 + c.clip_eps) * adv)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    return np.sum(w * (-(pg - c.beta * kl) - c.alpha_ent * ent))


def test_policy_loss_against_numpy():
    rng = np.random.default_rng(0)
    b, t, v = 3, 5, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    old = rng.normal(size=(b, t)).astype(np.float32) * 0.3 - 2
    ref = rng.normal(size=(b, t)).astype(np.float32) * 0.3 - 2
    adv = rng.normal(size=(b, t)).astype(np.float32)
    w = (rng.random((b, t)) > 0.3).astype(np.float32)
    c = PolicyLossConfig(clip_eps=0.2, beta=0.1, alpha_ent=0.05)
    tis = rng.uniform(0.3, 2.0, (b, t)).astype(np.float32)
    logp, ent = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    got, stats = policy_loss_sum(logp, ent, old, adv, w, ref, c, tis=jnp.asarray(tis))
    np.testing.assert_allclose(
        float(got), _np_loss(logits.astype(np.float64), targets, old, ref, adv, w, c, tis), rtol=1e-5
    )
    assert float(stats["token_count"]) == w.sum()
    lp = np.asarray(logp, np.float64)
    r = np.exp(lp - old)
    m = w > 0
    clipped = ((adv > 0) & (r > 1.2)) | ((adv < 0) & (r < 0.8))  # where the clip takes the gradient away
    assert float(stats["clip_count"]) == clipped[m].sum() and clipped[m].any()
    np.testing.assert_allclose(float(stats["ratio_max"]), r[m].max(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["approx_kl_sum"]), np.sum(((r - 1) - np.log(r))[m]), rtol=1e-4)


def test_entropy_bonus_encourages_exploration():
    # with zero advantage and no KL, the loss gradient must push towards higher entropy
    logits = jnp.array([[[3.0, 0.0, -1.0]]])
    c = PolicyLossConfig(beta=0.0, alpha_ent=1.0)

    def loss(lg):
        logp, ent = token_logprobs(lg, jnp.array([[0]]))
        return policy_loss_sum(logp, ent, jax.lax.stop_gradient(logp), jnp.zeros((1, 1)), jnp.ones((1, 1)), None, c)[0]

    stepped = logits - 0.1 * jax.grad(loss)(logits)
    _, e0 = token_logprobs(logits, jnp.array([[0]]))
    _, e1 = token_logprobs(stepped, jnp.array([[0]]))
    assert float(e1[0, 0]) > float(e0[0, 0])


def test_token_weights_modes():
    keep = np.array([3, 5, 2])
    assert token_weights("c3po", keep, budget=10) == ([1.0, 1.0, 1.0], 10.0)
    assert token_weights("token_mean", keep) == ([1.0, 1.0, 1.0], 10.0)
    w, n = token_weights("seq_mean", keep)
    assert n == 3.0 and np.allclose(w, [1 / 3, 1 / 5, 1 / 2])
    with pytest.raises(ValueError, match="budget"):
        token_weights("c3po", keep)
