"""Sampling rules against NumPy oracles."""

import jax
import jax.numpy as jnp
import numpy as np

from ring_jax.sampling import rules

# jitted once per shape (eager op-by-op dispatch compiles every op separately: slow on a loaded 2-core machine)
filter_logits = jax.jit(rules.filter_logits)
top_k_mask = jax.jit(rules.top_k_mask)
top_p_mask = jax.jit(rules.top_p_mask)
sample_tokens = jax.jit(rules.sample_tokens, static_argnames="filtered")
sampling_logprobs = jax.jit(rules.sampling_logprobs, static_argnames="filtered")


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _oracle_top_p(row, p):
    """Smallest set of most likely tokens whose mass is >= p (float64)."""
    if p >= 1.0:
        return np.ones_like(row, bool)
    probs = _np_softmax(row.astype(np.float64))
    order = np.argsort(-probs, kind="stable")
    mass, keep = 0.0, np.zeros_like(row, bool)
    for i in order:
        keep[i] = True
        mass += probs[i]
        if mass >= p:
            break
    return keep


def _oracle_top_k(row, k):
    if k <= 0:
        return np.ones_like(row, bool)
    return row >= np.sort(row)[::-1][min(k, len(row)) - 1]


def test_top_p_mask_matches_numpy_oracle():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, (64, 50)).astype(np.float32)
    ps = rng.uniform(0.05, 1.0, 64).astype(np.float32)
    ps[:4] = [1.0, 0.999, 0.5, 1e-3]
    got = np.asarray(top_p_mask(jnp.asarray(logits), jnp.asarray(ps)))
    for i in range(64):
        want = _oracle_top_p(logits[i], float(ps[i]))
        assert np.array_equal(got[i], want), (i, ps[i], got[i].sum(), want.sum())
        # the kept set is the smallest with mass >= p: dropping its least likely member falls below p
        probs = _np_softmax(logits[i].astype(np.float64))
        assert probs[want].sum() >= ps[i] - 1e-6
        if want.sum() > 1 and ps[i] < 1:
            assert probs[want].sum() - probs[want].min() < ps[i]


def test_top_k_mask_and_combined_filter_match_oracle():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (32, 40)).astype(np.float32)
    ks = rng.integers(0, 45, 32).astype(np.int32)
    ps = rng.uniform(0.1, 1.0, 32).astype(np.float32)
    ps[::3] = 1.0
    got_k = np.asarray(top_k_mask(jnp.asarray(logits), jnp.asarray(ks)))
    got = np.asarray(filter_logits(jnp.asarray(logits), jnp.asarray(ks), jnp.asarray(ps)))
    for i in range(32):
        mk = _oracle_top_k(logits[i], int(ks[i]))
        assert np.array_equal(got_k[i], mk)
        # HF order: top-k, then top-p on the renormalised top-k distribution
        sub = np.where(mk, logits[i], -np.inf)
        want = mk & _oracle_top_p(sub, float(ps[i]))
        assert np.array_equal(np.isfinite(got[i]), want), i
        assert np.array_equal(got[i][want], logits[i][want])


def test_sample_tokens_greedy_topk1_and_logprobs():
    rng = np.random.default_rng(2)
    b, v = 6, 30
    logits = jnp.asarray(rng.normal(0, 2, (b, v)).astype(np.float32))
    keys = jax.random.split(jax.random.key(0), b)
    temp = jnp.asarray([0.0, 0.0, 1.0, 0.7, 1.3, 1.0], jnp.float32)
    topk = jnp.asarray([0, 0, 1, 1, 0, 5], jnp.int32)
    topp = jnp.asarray([1.0, 0.3, 1.0, 1.0, 0.6, 0.8], jnp.float32)
    tok, lp, raw = map(np.asarray, sample_tokens(logits, keys, temp, topk, topp, filtered=True))
    am = np.asarray(jnp.argmax(logits, -1))
    assert np.array_equal(tok[:4], am[:4])  # greedy rows and top-k = 1 rows
    assert np.all(lp[:2] == 0.0)  # greedy: a point mass
    np.testing.assert_allclose(lp[2:4], 0.0, atol=1e-6)  # top-k = 1: the kept token has all the mass
    raw_all = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(raw, raw_all[np.arange(b), tok], atol=1e-6)
    samp_all = np.asarray(sampling_logprobs(logits, temp, topk, topp, filtered=True))
    np.testing.assert_allclose(lp[2:], samp_all[np.arange(2, b), tok[2:]], atol=1e-6)
    assert np.all(np.isfinite(lp))


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]], jnp.float32)
    n = 4000
    lg = jnp.broadcast_to(logits, (n, 6))
    keys = jax.random.split(jax.random.key(3), n)
    temp, topk, topp = jnp.full((n,), 0.8), jnp.full((n,), 4, jnp.int32), jnp.full((n,), 0.9)
    tok, _, _ = sample_tokens(lg, keys, temp, topk, topp, filtered=True)
    freq = np.bincount(np.asarray(tok), minlength=6) / n
    want = np.exp(np.asarray(sampling_logprobs(logits, temp[:1], topk[:1], topp[:1], filtered=True))[0])
    assert freq[4] == freq[5] == 0.0
    np.testing.assert_allclose(freq, want, atol=0.03)


def _sorted_filter(logits, top_k, top_p):
    """The engine's filter before issue 15 (a full sort per row), as the reference for the bisection thresholds."""
    v = logits.shape[-1]
    s = -jnp.sort(-logits, axis=-1)
    rank = jnp.arange(v)[None, :]
    kk = jnp.where(top_k <= 0, v, jnp.minimum(top_k, v))
    in_k = rank < kk[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, s, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    thresh = jnp.take_along_axis(s, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= thresh, logits, -jnp.inf)


def test_bisection_filter_equals_the_sorted_filter():
    """Without a sort, the same kept set as the sort + cumsum formulation, except where the top-p boundary token's
    mass lies within float32 rounding of p (then either answer is the float64 one up to rounding)."""
    rng = np.random.default_rng(5)
    b, v = 512, 300
    logits = jnp.asarray(rng.normal(0, 3.0, (b, v)).astype(np.float32))
    ks = jnp.asarray(rng.choice([0, 1, 7, 40, 299, 300, 500], b).astype(np.int32))
    ps = jnp.asarray(rng.choice([1.0, 0.95, 0.9, 0.5, 0.01], b).astype(np.float32))
    got = np.isfinite(np.asarray(filter_logits(logits, ks, ps)))
    want = np.isfinite(np.asarray(jax.jit(_sorted_filter)(logits, ks, ps)))
    for i in np.nonzero((got != want).any(axis=1))[0]:
        row = np.asarray(logits[i], np.float64)
        if ks[i] > 0:
            row = np.where(row >= np.sort(row)[::-1][min(int(ks[i]), v) - 1], row, -np.inf)
        probs = _np_softmax(row)
        before = np.sort(probs)[::-1].cumsum() - np.sort(probs)[::-1]
        n = min(got[i].sum(), want[i].sum())
        assert abs(before[n] - ps[i]) < 1e-6, (i, got[i].sum(), want[i].sum(), before[n], ps[i])
    assert (got == want).all(axis=1).mean() > 0.99
