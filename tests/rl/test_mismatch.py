"""The trainer / sampler mismatch (ring_jax.rl.mismatch) and what acts on it in the RL step: metrics against
hand-computed values, IcePop against a NumPy oracle (masked tokens get no policy gradient, the others are
unchanged), and one RL step with a bfloat16 sampler, pi_old from the trainer, IcePop and routing replay whose
batch and update are checked against independent forwards and the NumPy objective."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.rl.losses import PolicyLossConfig, policy_loss_sum
from ring_jax.rl.mismatch import icepop_mask, mismatch_metrics, parse_icepop, routing_disagreement
from ring_jax.rl.step import RLConfig, RLStep
from ring_jax.sharding import make_mesh
from tests.rl.oracle import policy_loss_and_dlogits
from tests.rl.test_rl_step import _first_even, _recording, _setup  # noqa: F401 (registers first_even)


# ------------------------------------------------------------------------------------------------- host side
def test_mismatch_metrics_by_hand():
    train = np.log([0.5, 0.2, 0.9, 0.1])
    infer = np.log([0.5, 0.5, 0.3, 0.1])
    m = mismatch_metrics(train, infer)
    d = np.log([1.0, 0.4, 3.0, 1.0])
    assert m["logp_abs_mean"] == pytest.approx(np.mean(np.abs(d)))
    assert m["logp_abs_max"] == pytest.approx(np.log(3.0))
    assert m["logp_abs_p50"] == pytest.approx(np.median(np.abs(d)))
    assert m["logp_abs_p99"] == pytest.approx(np.quantile(np.abs(d), 0.99))
    assert m["kl"] == pytest.approx(np.mean([0.0, 0.4 - 1 - np.log(0.4), 3 - 1 - np.log(3.0), 0.0]))
    assert m["ratio_out_2x_frac"] == pytest.approx(0.5)  # 0.4 and 3 are past 2x, 1 and 1 are not
    assert m["tokens"] == 4
    assert np.isnan(mismatch_metrics(np.zeros(0), np.zeros(0))["kl"])


def test_routing_disagreement_compares_sets_on_recorded_tokens():
    trainer = np.array([[[0, 1], [2, 3]], [[1, 0], [2, 4]], [[5, 6], [7, 0]]])  # [tokens, layers, k]
    sampler = np.array([[[1, 0], [2, 3]], [[1, 0], [3, 2]], [[-1, -1], [-1, -1]]])  # order within k is no change
    frac, tok_frac, n = routing_disagreement(trainer, sampler)
    assert n == 2 and frac == pytest.approx(1 / 4) and tok_frac == pytest.approx(1 / 2)


def test_icepop_mask_band_and_parsing():
    infer = np.log(np.full(5, 0.4))
    train = np.log(np.array([0.4, 0.2, 0.19, 0.8, 0.81]))  # ratios 1, 0.5, 0.475, 2, 2.025
    np.testing.assert_array_equal(icepop_mask(train, infer, (0.5, 2.0)), [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(icepop_mask(train, infer, None), np.ones(5))
    assert parse_icepop("0.5,2") == (0.5, 2.0) and parse_icepop(["0.5", "2.0"]) == (0.5, 2.0)
    assert parse_icepop("") is None and parse_icepop([]) is None
    for bad in ("2,0.5", "1.2,2", "0.5", "a,b", "0.5,inf"):
        with pytest.raises(ValueError, match="icepop"):
            parse_icepop(bad)
    with pytest.raises(ValueError, match="icepop"):
        RLConfig(icepop="0.5")
    with pytest.raises(ValueError, match="old_logp"):
        RLConfig(old_logp="reference")
    with pytest.raises(ValueError, match="rollout_dtype"):
        RLConfig(rollout_dtype="int8")


def test_icepop_gradient_against_numpy_oracle():
    """d loss / d logp per token: masked tokens get no policy-gradient term (zero with beta = alpha_ent = 0, only
    the KL term with beta > 0); unmasked tokens' gradient equals the unmasked loss's.  Oracle: the PPO-clip
    derivative written out in NumPy."""
    rng = np.random.default_rng(0)
    n = 64
    logp = jnp.asarray(rng.normal(-2.0, 0.3, (1, n)), jnp.float32)
    old = logp + jnp.asarray(rng.normal(0, 0.3, (1, n)), jnp.float32)
    adv = jnp.asarray(rng.normal(size=(1, n)), jnp.float32)
    tis = jnp.asarray(rng.uniform(0.5, 1.5, (1, n)), jnp.float32)
    mask = jnp.asarray(rng.random((1, n)) > 0.3, jnp.float32)
    ref = logp + 0.1
    w = jnp.ones((1, n))
    ent = jnp.zeros((1, n))

    def grad(cfg, m):
        return np.asarray(
            jax.grad(lambda lp: policy_loss_sum(lp, ent, old, adv, w, ref, cfg, tis=tis, pg_mask=m)[0])(logp)
        )[0]

    eps = 0.2
    r = np.exp(np.asarray(logp - old, np.float64))[0]
    a = np.asarray(adv, np.float64)[0]
    active = ~(((a > 0) & (r > 1 + eps)) | ((a < 0) & (r < 1 - eps)))
    want_pg = -np.asarray(tis)[0] * a * r * active
    msk = np.asarray(mask)[0] > 0
    assert 0 < msk.sum() < n and np.abs(want_pg[~msk]).max() > 1e-2  # the masked tokens had gradient to lose
    g = grad(PolicyLossConfig(clip_eps=eps, beta=0.0, alpha_ent=0.0), mask)
    np.testing.assert_array_equal(g[~msk], 0.0)
    np.testing.assert_allclose(g[msk], want_pg[msk], rtol=1e-5, atol=1e-6)
    g_off = grad(PolicyLossConfig(clip_eps=eps, beta=0.0, alpha_ent=0.0), None)
    np.testing.assert_allclose(g_off, want_pg, rtol=1e-5, atol=1e-6)
    beta = 0.05  # with a KL term, a masked token keeps exactly that term's gradient
    g_kl = grad(PolicyLossConfig(clip_eps=eps, beta=beta, alpha_ent=0.0), mask)
    d = np.asarray(ref - logp, np.float64)[0]
    np.testing.assert_allclose(g_kl[~msk], beta * (1 - np.exp(d))[~msk], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------- the RL step
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, positions, segment_ids, routing):
    out = nnx.merge(graphdef, params)(tokens, positions, segment_ids, routing=routing)
    return out.logits


def _np(graphdef, params, b, routing):
    args = [jnp.asarray(b[k]) for k in ("tokens", "positions", "segment_ids")]
    return np.asarray(_forward(graphdef, params, *args, None if routing is None else jnp.asarray(routing)))


@pytest.mark.parametrize("aggregation", ["c3po", "token_mean"])
def test_bf16_rollout_trainer_pi_old_icepop_and_replay_end_to_end(aggregation):
    """A bfloat16 sampler beside the float32 trainer, pi_old from the trainer, IcePop with a narrow band (so it
    masks on the tiny model) and routing replay.  Oracles: the batch's routing is each completion's record at its
    tokens' positions; old_logp is an independent float32 forward at the rollout parameters replaying that record;
    pg_mask is the band applied to it against the sampler's log-probs; token_mean's normaliser counts the unmasked
    tokens only; the update's loss and gradient equal the NumPy objective on the replayed forward's logits."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    lr, phi, band = 1.0, 48, (0.995, 1.005)
    rl = RLConfig(
        samples_per_prompt=4,
        budget=phi,
        aggregation=aggregation,
        max_new_tokens=12,
        seq_len=32,
        num_slots=16,
        alpha_bal=0.0,
        alpha_z=0.0,
        rollout_dtype="bfloat16",
        old_logp="trainer",
        icepop=band,
        routing_replay=True,
        policy=PolicyLossConfig(beta=0.0, alpha_ent=0.0),
    )
    graphdef, state, step = _setup(mesh, sgd=lr, rl=rl)
    log = []
    rls = RLStep(
        graphdef,
        _recording(step, log),
        rl,
        encode_prompt=lambda r: r["prompt_ids"],
        decode=lambda ids: " ".join(map(str, ids)),
        seed=3,
    )
    params0 = jax.tree.map(np.array, state.params)
    records = [{"task": "first_even", "prompt_ids": [3, 4, 5 + i]} for i in range(4)]
    state, m = rls(state, records)
    comps = rls.last_completions
    assert len(log) == 1 and all(c.routing is not None for c in comps)
    b = log[0]["batch"]
    trained = b["weights"] > 0
    # routing: each segment's positions hold its completion's record
    seen = 0
    for i in range(b["tokens"].shape[0]):
        for s in range(1, b["segment_ids"][i].max() + 1):
            pos = np.nonzero(b["segment_ids"][i] == s)[0]
            ids = b["tokens"][i, pos]
            c = next(
                c
                for c in comps
                if len(ids) <= len(c.prompt_ids) + len(c.token_ids)
                and np.array_equal(np.concatenate([c.prompt_ids, c.token_ids])[: len(ids)], ids)
            )
            np.testing.assert_array_equal(b["routing"][i, pos], c.routing[: len(ids)])
            seen += 1
    assert seen >= 2 and (b["routing"][b["segment_ids"] == 0] == -1).all()
    # old_logp: the trainer's float32 log-probs at the rollout parameters, with the recorded routing replayed
    logits = _np(graphdef, params0, b, b["routing"])
    lp = jax.nn.log_softmax(jnp.asarray(logits), -1)
    want_old = np.take_along_axis(np.asarray(lp), b["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(b["old_logp"][trained], want_old[trained], atol=2e-5)
    # IcePop: the band on pi_train / pi_infer, pi_infer the sampler's own (bfloat16) temperature-1 log-probs
    assert 0 < m["icepop/masked_frac"] < 1
    assert m["icepop/masked_frac"] == pytest.approx(1 - b["pg_mask"][trained].mean())
    assert m["mismatch/logp_abs_mean"] > 1e-4 and m["mismatch/tokens"] == trained.sum()
    # mask == band(old - infer) token by token: infer placed like old by the same segment walk
    infer_rows = np.zeros_like(b["old_logp"])
    for i in range(b["tokens"].shape[0]):
        for s in range(1, b["segment_ids"][i].max() + 1):
            t = np.nonzero((b["segment_ids"][i] == s) & trained[i])[0]
            seq = b["targets"][i, t]
            c = next(c for c in comps if np.array_equal(c.token_ids[: len(seq)], seq))
            infer_rows[i, t] = c.raw_logprobs[: len(seq)]
    want_mask = icepop_mask(b["old_logp"], infer_rows, band)
    np.testing.assert_array_equal(b["pg_mask"][trained], want_mask[trained])
    if aggregation == "token_mean":
        assert log[0]["phi"] == pytest.approx(b["pg_mask"][trained].sum()) and log[0]["phi"] < trained.sum()
    else:
        assert log[0]["phi"] == phi
    # the update: NumPy objective on the replayed forward's logits, gradient pulled back through the same forward
    loss, dz = policy_loss_and_dlogits(logits, b, log[0]["phi"], rl.policy.clip_eps, 0.0, 0.0)
    assert m["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    args = [jnp.asarray(b[k]) for k in ("tokens", "positions", "segment_ids")]
    _, pull = jax.vjp(lambda p: _forward(graphdef, p, *args, jnp.asarray(b["routing"])), params0)
    want_g = pull(jnp.asarray(dz, jnp.float32))[0]
    got_g = jax.tree.map(lambda a, c: (a - c) / lr, log[0]["before"], log[0]["after"])
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, np.asarray(w), atol=2e-5, rtol=2e-3)
    for k in ("mismatch/kl", "mismatch/logp_abs_max", "mismatch/ratio_out_2x_frac", "mismatch/routing_disagree_frac"):
        assert np.isfinite(m[k]), k


def test_kl_without_a_reference_is_an_error():
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    rl = RLConfig(policy=PolicyLossConfig(beta=1e-3))
    graphdef, _, step = _setup(mesh, rl=RLConfig(policy=PolicyLossConfig(beta=0.0)))
    with pytest.raises(ValueError, match="ref_params"):
        RLStep(graphdef, step, rl, encode_prompt=lambda r: r["prompt_ids"], decode=str)
