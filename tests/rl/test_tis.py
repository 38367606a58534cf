"""Off-policy correction by exact enumeration on a tiny vocabulary: the expected gradient of the RL loss over the
sampler's distribution, with and without the truncated importance weights, against the exact policy gradient.

The sampler distribution q is the engine's own (``ring_jax.sampling.rules.sampling_logprobs``: temperature, top-p);
the per-sample gradient is ``jax.grad`` of the library's ``policy_loss_sum`` with weights from ``tis_weights``; the
target is the REINFORCE gradient of J(theta) = E_{y ~ pi_theta}[R(y)] summed over every outcome.

Top-p never samples the tail it cuts, so no weighting of samples can recover the tail's share of the gradient: with
top-p the tests give R = 0 on the tail (as a verifier's reward is for tokens a model practically never emits), and
one test states the tail term that remains otherwise.  With temperature alone (full support) the token-level weight
makes a one-token response exactly unbiased; for longer responses the sequence-level weight is exact and the
token-level one is not (its prefixes are still drawn from q)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ring_jax.rl.losses import PolicyLossConfig, policy_loss_sum, tis_weights
from ring_jax.sampling.rules import sampling_logprobs

CFG = PolicyLossConfig(clip_eps=0.2, beta=0.0, alpha_ent=0.0)
# jitted, as the engine runs it: called eagerly, the filters' lax.cond (closing over the logits) compiles anew on
# every call, which made this file take minutes
_sampling_logprobs = jax.jit(sampling_logprobs, static_argnames="filtered")


def _q_logp(logits, temperature, top_p):
    lg = jnp.asarray(logits, jnp.float32)[None]
    return np.asarray(
        _sampling_logprobs(
            lg,
            jnp.array([temperature], jnp.float32),
            jnp.array([0], jnp.int32),
            jnp.array([top_p], jnp.float32),
            filtered=top_p < 1.0,
        )[0],
        np.float64,
    )


def _surrogate_grad(theta, seq, reward, tis):
    """-d loss / d theta at theta for one sampled sequence (theta = (step-1 logits [V], step-2 table [V, V]))."""

    def loss(th):
        logits = [th[0]] + [th[1][seq[0]]][: len(seq) - 1]
        logp = jnp.stack([jax.nn.log_softmax(lg)[y] for lg, y in zip(logits, seq)])[None]
        ones = jnp.ones_like(logp)
        return policy_loss_sum(
            logp,
            0 * logp,
            jax.lax.stop_gradient(logp),
            reward * ones,
            ones,
            None,
            CFG,
            tis=jnp.asarray(tis, jnp.float32)[None],
        )[0]

    return jax.tree.map(lambda g: -np.asarray(g, np.float64), jax.grad(loss)(theta))


def _expected(theta, rewards, temperature, top_p, length, mode, cap=1e9):
    """E_{y ~ q}[-grad loss] by enumeration over every sequence of ``length`` tokens; mode None / token /
    sequence."""
    v = theta[0].shape[0]
    acc = jax.tree.map(lambda t: np.zeros(t.shape), theta)
    for seq in itertools.product(range(v), repeat=length):
        ctx = [theta[0]] + [theta[1][seq[0]]][: length - 1]
        q = [_q_logp(lg, temperature, top_p)[y] for lg, y in zip(ctx, seq)]
        if not np.all(np.isfinite(q)):
            continue  # never sampled
        p = [np.asarray(jax.nn.log_softmax(lg), np.float64)[y] for lg, y in zip(ctx, seq)]
        w = np.ones(length) if mode is None else tis_weights(p, q, cap, mode)[0]
        g = _surrogate_grad(theta, seq, rewards[seq], w)
        acc = jax.tree.map(lambda a, b: a + np.exp(np.sum(q)) * b, acc, g)  # noqa: B023 (called in this iteration)
    return acc


def _exact(theta, rewards, length, support=None):
    """sum over all sequences of p(y) R(y) grad log p(y) (optionally only over ``support``)."""
    v = theta[0].shape[0]

    def logp_seq(th, seq):
        ctx = [th[0]] + [th[1][seq[0]]][: length - 1]
        return sum(jax.nn.log_softmax(lg)[y] for lg, y in zip(ctx, seq))

    acc = jax.tree.map(lambda t: np.zeros(t.shape), theta)
    for seq in itertools.product(range(v), repeat=length):
        if support is not None and seq not in support:
            continue
        lp, g = jax.value_and_grad(logp_seq)(theta, seq)
        acc = jax.tree.map(lambda a, b: a + float(np.exp(lp)) * rewards[seq] * np.asarray(b, np.float64), acc, g)  # noqa: B023 (called in this iteration)
    return acc


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _theta(v, seed):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=v) * 1.5, jnp.float32), jnp.asarray(rng.normal(size=(v, v)) * 1.5, jnp.float32))


def _rel(a, b):
    return np.linalg.norm(_flat(a) - _flat(b)) / np.linalg.norm(_flat(b))


@pytest.mark.parametrize("temperature,top_p", [(0.6, 1.0), (1.0, 0.7), (0.7, 0.8)])
def test_one_token_tis_removes_the_sampler_bias(temperature, top_p):
    v = 6
    theta = _theta(v, 0)
    q = _q_logp(theta[0], temperature, top_p)
    rewards = {(y,): (float(np.random.default_rng(y).normal()) if np.isfinite(q[y]) else 0.0) for y in range(v)}
    exact = _exact(theta, rewards, 1)
    corrected = _expected(theta, rewards, temperature, top_p, 1, "token")
    plain = _expected(theta, rewards, temperature, top_p, 1, None)
    assert _rel(corrected, exact) < 1e-4
    assert _rel(plain, exact) > 0.05  # the uncorrected estimate is biased


def test_top_p_tail_is_the_only_bias_left():
    """With reward on the tail too, the corrected estimate equals the exact gradient minus exactly the tail's
    share (sum over unsampled y of p R grad log p)."""
    v, top_p = 6, 0.7
    theta = _theta(v, 1)
    q = _q_logp(theta[0], 1.0, top_p)
    rewards = {(y,): float(np.random.default_rng(10 + y).normal()) for y in range(v)}
    tail = {(y,) for y in range(v) if not np.isfinite(q[y])}
    assert tail
    corrected = _expected(theta, rewards, 1.0, top_p, 1, "token")
    want = jax.tree.map(lambda a, b: a - b, _exact(theta, rewards, 1), _exact(theta, rewards, 1, support=tail))
    assert _rel(corrected, want) < 1e-4


def test_two_token_sequence_weight_is_exact_where_token_weight_is_not():
    v, temperature, top_p = 4, 0.7, 0.85
    theta = _theta(v, 2)
    rng = np.random.default_rng(3)
    rewards = {}
    for seq in itertools.product(range(v), repeat=2):
        ok = np.isfinite(_q_logp(theta[0], temperature, top_p)[seq[0]]) and np.isfinite(
            _q_logp(theta[1][seq[0]], temperature, top_p)[seq[1]]
        )
        rewards[seq] = float(rng.normal()) if ok else 0.0
    exact = _exact(theta, rewards, 2)
    assert _rel(_expected(theta, rewards, temperature, top_p, 2, "sequence"), exact) < 1e-4
    assert _rel(_expected(theta, rewards, temperature, top_p, 2, None), exact) > 0.05
    assert _rel(_expected(theta, rewards, temperature, top_p, 2, "token"), exact) > 1e-3


def test_tis_weights_truncate_and_switch_off():
    old = np.log([0.5, 0.2, 0.1])
    q = np.log([0.25, 0.4, 0.01])
    w, cut = tis_weights(old, q, 2.0, "token")
    np.testing.assert_allclose(w, [2.0, 0.5, 2.0], rtol=1e-6)  # 2, 0.5, 10 -> capped at 2
    np.testing.assert_array_equal(cut, [False, False, True])
    w, cut = tis_weights(old, q, 100.0, "sequence")
    np.testing.assert_allclose(w, [10.0] * 3, rtol=1e-5)  # 2 * 0.5 * 10 for every token
    w, cut = tis_weights(old, q, 0.0)
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="level"):
        tis_weights(old, q, 2.0, "batch")
