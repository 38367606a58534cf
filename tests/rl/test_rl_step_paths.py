"""RL-step paths that tests/rl/test_rl_step.py leaves out, end to end on the tiny model against independent oracles:
the sample-level aggregations (``seq_mean``, ``token_mean``: per-token weights, the normaliser, and the update
against the NumPy objective) and sequence-level truncated importance sampling over a budget-cut response's kept
prefix."""

import jax
import numpy as np
import pytest

from ring_jax.rl.losses import PolicyLossConfig
from ring_jax.rl.step import RLConfig, RLStep
from ring_jax.sharding import make_mesh
from tests.rl.oracle import policy_loss_and_dlogits
from tests.rl.test_rl_step import _first_even, _grad_np, _logits_np, _recording, _setup  # noqa: F401 (registers)

# Extra stop tokens (besides the tiny preset's eos 1): a near-uniform model then ends about half of its 12-token
# responses early, so the selected responses' lengths differ and seq_mean's 1 / len_i weights are not one constant
# (with equal lengths seq_mean and token_mean give the same loss and a swapped normaliser would go unnoticed).
STOP_IDS = (1, 2, 3, 4, 5, 6, 7, 8)


def _rls(graphdef, step, rl, log, seed):
    return RLStep(
        graphdef,
        _recording(step, log),
        rl,
        encode_prompt=lambda r: r["prompt_ids"],
        decode=lambda ids: " ".join(map(str, ids)),
        stop_ids=STOP_IDS,
        seed=seed,
    )


def _records(n=4):
    return [{"task": "first_even", "prompt_ids": [9, 10, 11 + i]} for i in range(n)]


def _locate(batch, comps, sel):
    """For each selected response j (in ``sel`` order): (row, the positions that predict its kept tokens), found by
    content -- the segment whose tokens are ``prompt + response[:keep]`` -- and independently of the batch's
    weights.  Asserts each is found exactly once and that these positions are exactly the batch's trained ones."""
    segs = {}
    for r in range(batch["tokens"].shape[0]):
        for s in range(1, int(batch["segment_ids"][r].max()) + 1):
            pos = np.nonzero(batch["segment_ids"][r] == s)[0]
            segs[(r, s)] = pos
    out, used = [], set()
    for i, k in zip(sel.index, sel.keep):
        c = comps[i]
        doc = np.concatenate([np.asarray(c.prompt_ids), c.token_ids[:k]])
        hits = [
            key
            for key, pos in segs.items()
            if key not in used and len(pos) == len(doc) and np.array_equal(batch["tokens"][key[0], pos], doc)
        ]
        assert len(hits) >= 1, f"selected response {i} (keep {k}) is in no segment"
        used.add(hits[0])
        r, s = hits[0]
        out.append((r, segs[(r, s)][0] + len(c.prompt_ids) - 1 + np.arange(k)))
    assert len(used) == len(segs), "a segment holds no selected response"
    mask = np.zeros(batch["weights"].shape, bool)
    for r, t in out:
        mask[r, t] = True
    np.testing.assert_array_equal(mask, batch["weights"] > 0)
    return out


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_sample_level_aggregation_weights_normaliser_and_update(aggregation):
    """One RLStep with a sample-level aggregation (8 of the 16 rollout responses, SGD so the update is minus lr times
    the gradient).  Independent oracles: each trained token weighs 1 / len_i of its response's kept tokens (seq_mean)
    or 1 (token_mean); the normaliser is the number of selected responses (seq_mean) or the trained tokens
    (token_mean), never the pool's; and the update's loss and parameter gradient are the NumPy objective with those
    weights and that normaliser (oracle.py), so a wrong weight or normaliser anywhere on the path fails."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    lr, eps, ent, per = 2.0, 0.2, 0.01, 8
    rl = RLConfig(
        aggregation=aggregation,
        responses_per_step=per,
        samples_per_prompt=4,
        max_new_tokens=12,
        seq_len=32,
        num_slots=16,
        alpha_bal=0.0,
        alpha_z=0.0,
        policy=PolicyLossConfig(clip_eps=eps, beta=0.0, alpha_ent=ent),
    )
    graphdef, state, step = _setup(mesh, sgd=lr, rl=rl)
    log = []
    rls = _rls(graphdef, step, rl, log, seed=7)
    state, m = rls(state, _records())
    comps, [sel] = rls.last_completions, rls.last_selections
    assert m["updates"] == 1 and len(log) == 1 and m["responses"] == 16
    keep = np.array([len(comps[i].token_ids) for i in sel.index])  # untruncated: the whole response is trained
    assert len(sel.index) == per and np.array_equal(sel.keep, keep)
    assert len(set(keep.tolist())) > 1, "the selected responses all have one length: seq_mean is not tested"
    rec = log[0]
    b = rec["batch"]
    # independent weights and normaliser
    want_w = np.zeros_like(b["weights"], np.float64)
    for (r, t), k in zip(_locate(b, comps, sel), keep):
        want_w[r, t] = 1.0 / k if aggregation == "seq_mean" else 1.0
    want_phi = float(per) if aggregation == "seq_mean" else float(keep.sum())
    assert want_phi != (16.0 if aggregation == "seq_mean" else sum(len(c.token_ids) for c in comps))  # not the pool
    np.testing.assert_allclose(b["weights"], want_w, rtol=1e-6, atol=0)
    assert rec["phi"] == want_phi and m["normalizer"] == want_phi
    # the update against the NumPy objective with the independent weights and normaliser
    ob = dict(b, weights=want_w)
    loss, dz = policy_loss_and_dlogits(_logits_np(graphdef, rec["before"], b), ob, want_phi, eps, 0.0, ent)
    assert m["update/1/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    want = _grad_np(graphdef, rec["before"], b, dz)
    got = jax.tree.map(lambda a, c: (a - c) / lr, rec["before"], rec["after"])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, np.asarray(w), atol=2e-5, rtol=2e-3)


def test_sequence_level_tis_is_the_product_over_the_kept_prefix():
    """Sequence-level TIS at top-p 0.9 (pi_old / q != 1 on every token) with two C3PO budgets small enough that
    their last responses are cut to a prefix.  For every trained response, each of its tokens carries the one
    weight min(exp(sum over its KEPT tokens of (raw_logprobs - logprobs)), cap), computed here from the completions
    and selections; a cut response shows that the product over the whole response would differ.  The first
    update's loss is the NumPy objective with those weights."""
    mesh = make_mesh("data:1", devices=jax.devices()[:1])
    phi, cap, ent = 30, 2.0, 0.01
    rl = RLConfig(
        samples_per_prompt=4,
        budget=phi,
        updates_per_rollout=2,
        max_new_tokens=12,
        seq_len=32,
        num_slots=16,
        top_p=0.9,
        tis_level="sequence",
        tis_cap=cap,
        alpha_bal=0.0,
        alpha_z=0.0,
        policy=PolicyLossConfig(beta=0.0, alpha_ent=ent),
    )
    graphdef, state, step = _setup(mesh, sgd=0.1, rl=rl)
    log = []
    rls = _rls(graphdef, step, rl, log, seed=11)
    state, m = rls(state, _records())
    comps, sels = rls.last_completions, rls.last_selections
    assert m["updates"] == 2 and len(log) == 2
    cut = 0
    for sel, rec in zip(sels, log):
        b = rec["batch"]
        assert b["weights"].sum() == phi
        for (r, t), i, k in zip(_locate(b, comps, sel), sel.index, sel.keep):
            c = comps[i]
            d = np.asarray(c.raw_logprobs, np.float64) - np.asarray(c.logprobs, np.float64)
            w_kept = min(np.exp(d[:k].sum()), cap)
            np.testing.assert_allclose(b["tis"][r, t], np.full(k, w_kept), rtol=1e-5, atol=0)
            if k < len(c.token_ids):
                cut += 1
                w_full = min(np.exp(d.sum()), cap)
                assert abs(w_full - w_kept) > 1e-2 * w_kept, (w_full, w_kept)  # the whole response would differ
        assert np.any(b["tis"][b["weights"] > 0] < 0.99)  # top-p: the weights are not 1
    assert cut >= 1, "no selected response was cut to a prefix"
    rec = log[0]
    loss, _ = policy_loss_and_dlogits(_logits_np(graphdef, rec["before"], rec["batch"]), rec["batch"], phi, 0.2, 0, ent)
    assert m["update/1/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
