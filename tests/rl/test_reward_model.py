"""Learned reward model (tiny preset, float32): the score is the value head on the last real token's hidden state of
an unpadded forward pass; it does not depend on batch partners, padding or the mesh; the `reward_model` reward task
uses it once registered; Bradley-Terry steps learn a synthetic preference; checkpoints round-trip."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ring_jax.config import get_preset
from ring_jax.data import train_bpe
from ring_jax.model.reward_head import build_reward_net
from ring_jax.rewards import general, registry
from ring_jax.rl.reward_model import LearnedRewardModel, RewardModelError
from ring_jax.rl.reward_trainer import RewardModelTrainer, pairwise_accuracy
from ring_jax.sharding import make_mesh
from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
from ring_jax.train.step import split_model
from tests.helpers import numpy_params

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "table", "smile"]
MARK = "thanks"


def _pairs(n, seed):
    """(prompts, chosen, rejected): chosen = filler words with MARK inserted somewhere; rejected = the same filler."""
    rng = random.Random(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        with_mark = list(words)
        with_mark.insert(rng.randint(0, len(words)), MARK)
        prompts.append(f"Tell me about the {rng.choice(WORDS)}.")
        chosen.append(" ".join(with_mark))
        rejected.append(" ".join(words))
    return prompts, chosen, rejected


@pytest.fixture(scope="module")
def tok():
    p, c, r = _pairs(200, 0)
    return train_bpe(p + c + r, vocab_size=300)


@pytest.fixture(scope="module")
def cfg(tok):
    # "dense" MoE compiles ~3x faster than "dispatch" on CPU; test_dispatch_path_same_scores covers the default path
    return get_preset("tiny").replace(vocab_size=-(-tok.vocab_size // 64) * 64, moe_impl="dense")


ONE = make_mesh("data:1", devices=jax.devices()[:1])


def _numpy_params(cfg, seed=0, scale=0.05):
    """Random RewardNet parameters drawn with numpy (1-D weights = 1, the head bias 0): the library's compiled
    initialiser costs ~8 s of compilation on CPU and is not what these tests are about."""
    _, _, abstract = split_model(nnx.eval_shape(lambda: build_reward_net(cfg)))
    out = numpy_params(abstract, seed, scale)
    out["value_head"]["bias"] = np.zeros((1,), np.float32)
    return out


@pytest.fixture(scope="module")
def rm(cfg, tok):
    return LearnedRewardModel(cfg, tok, mesh=ONE, params=_numpy_params(cfg), min_len=32)


def _texts():  # 3 rows (bucket 4) of at most 64 tokens (bucket 64); lengths ~12, ~20 and ~45
    return (
        ["Hi", "Tell me about the stone.", "Tell me about the river and the light and the cloud."],
        ["", "apple thanks river", "music " * 6],
    )


def test_score_is_head_on_last_token_of_unpadded_forward(rm):
    prompts, responses = _texts()
    got = np.asarray(rm.score_batch(prompts, responses))
    params = jax.device_get(rm.params)
    net = nnx.merge(rm.graphdef, params)
    hidden = jax.jit(lambda ids: net.backbone(ids, return_hidden=True, compute_logits=False).hidden)
    w = np.asarray(params["value_head"]["weight"], np.float64)[:, 0]
    b = float(np.asarray(params["value_head"]["bias"])[0])
    for p, r, g in zip(prompts, responses, got):
        ids = rm.encode(p, r)
        assert ids[-len(rm.renderer.stop_ids) :] == rm.renderer.stop_ids  # read at the end-of-turn marker
        h = hidden(jnp.asarray([ids], jnp.int32))  # one unpadded row, default positions and segments
        want = np.asarray(h[0, -1], np.float64) @ w + b
        assert abs(g - want) < 1e-5, (g, want)
    assert np.std(got) > 0  # the head reads something


def test_score_independent_of_partners_and_padding(rm):
    prompts, responses = _texts()
    batch = rm.score_batch(prompts, responses)
    seqs = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    assert len(seqs[0]) <= 32 < len(seqs[2]) <= 64  # alone, row 0 is padded to 32 tokens; in the batch to 64
    for i in (0, 2):
        alone = rm.score_batch(prompts[i : i + 1], responses[i : i + 1])[0]
        assert abs(batch[i] - alone) < 1e-5, (i, batch[i], alone)


def test_dispatch_path_same_scores(rm, cfg, tok):
    disp = LearnedRewardModel(cfg.replace(moe_impl="dispatch"), tok, mesh=ONE, params=rm.params, min_len=32)
    prompts, responses = _texts()
    np.testing.assert_allclose(
        disp.score_batch(prompts, responses), rm.score_batch(prompts, responses), atol=1e-5, rtol=0
    )


def test_scores_same_on_sharded_mesh(rm, cfg, tok):
    mesh = make_mesh("data:2,fsdp:2,expert:2")
    big = LearnedRewardModel(cfg, tok, mesh=mesh, params=jax.device_get(rm.params), min_len=32)
    assert big.row_multiple == 8
    emb = big.params["backbone"]["word_embeddings"].sharding.spec
    assert "fsdp" in str(emb)  # parameters really are sharded
    prompts, responses = _texts()
    np.testing.assert_allclose(
        big.score_batch(prompts, responses), rm.score_batch(prompts, responses), atol=1e-5, rtol=0
    )


def test_registered_model_scores_reward_model_task(rm):
    general.register_reward_model(rm)
    try:
        recs = [
            {"task": "reward_model", "prompt": "Tell me about the stone."},
            {"task": "ifeval", "prompt": "x", "constraints": [{"type": "lowercase"}]},
        ]
        results, stats = registry.score_batch(recs, ["apple thanks river", "ok"])
        want = rm.score_batch([recs[0]["prompt"]], ["apple thanks river"])[0]
        assert results[0].ok and abs(results[0].reward - want) < 1e-6
        assert results[1].reward == 1.0 and stats.per_task["reward_model"].count == 1
    finally:
        general.register_reward_model(None)


def test_bad_input_one_line(rm, cfg, tok):
    with pytest.raises(RewardModelError, match="2 prompts but 1 responses"):
        rm.score_batch(["a", "b"], ["c"])
    with pytest.raises(RewardModelError, match="must be strings"):
        rm.score_batch(["a"], [None])
    with pytest.raises(RewardModelError, match="vocabulary"):
        LearnedRewardModel(get_preset("tiny"), tok)
    assert rm.score_batch([], []) == []


def test_bradley_terry_learns_preference(rm, cfg, tok):
    rm = LearnedRewardModel(cfg, tok, mesh=ONE, params=rm.params, min_len=32)  # same start, own parameters
    train, test = _pairs(64, 1), _pairs(64, 2)
    before = pairwise_accuracy(rm, *test)
    opt, _ = make_optimizer(
        OptimConfig(lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.0), 100, decay_mask(rm.param_vars)
    )
    trainer = RewardModelTrainer(rm, opt, alpha_bal=1e-5)
    losses = []
    for step in range(8):  # 2 passes over 64 pairs, 16 per step (measured: 100% held-out accuracy after 4 steps)
        i = (step % 4) * 16
        m = trainer.step(*(x[i : i + 16] for x in train))
        losses.append(m["loss"])
        assert m["skipped"] == 0
    after = pairwise_accuracy(rm, *test)
    assert before < 0.75, before  # not already solved at initialisation (measured 0.22)
    assert after > 0.9, (before, after, losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2])


def test_policy_init_and_save_load(tmp_path, cfg, tok, rm):
    from ring_jax.train.checkpoint import Checkpointer

    base = jax.device_get(rm.params)
    policy = dict(base["backbone"], lm_head=np.ones((cfg.hidden_size, cfg.vocab_size), np.float32))
    with Checkpointer(str(tmp_path / "sft" / "ckpt")) as c:
        c.save(5, params=policy, meta={"model_config": cfg.to_hf_dict(), "runtime": {"moe_impl": "dense"}}, wait=True)
    tok.save(str(tmp_path / "sft" / "tokenizer"))
    from_policy = LearnedRewardModel.from_policy_checkpoint(str(tmp_path / "sft"))
    got = jax.device_get(from_policy.params)
    assert "lm_head" in policy and "lm_head" not in got["backbone"]
    jax.tree.map(np.testing.assert_array_equal, got["backbone"], {k: v for k, v in policy.items() if k != "lm_head"})

    rm.save(str(tmp_path / "rm"))
    back = LearnedRewardModel.load(str(tmp_path / "rm"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params), jax.device_get(rm.params))
    with pytest.raises(RewardModelError, match="not a reward-model checkpoint"):
        LearnedRewardModel.load(str(tmp_path / "sft"))
