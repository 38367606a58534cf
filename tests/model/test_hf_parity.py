"""Parity of ring_jax's BailingMoe with an independent NumPy forward of the upstream model, through HF export."""

import json
import os

import numpy as np
import pytest

from ring_jax.config import ModelConfig, get_preset
from ring_jax.hf import load_pretrained, save_pretrained
from ring_jax.model import abstract_model
from tests import numpy_reference as ref
from tests.helpers import logits, randomize_np

BASE = get_preset("tiny")
CASES = {
    # GQA, one dense layer first, one shared expert, renormalised top-k
    "gqa_dense_first_shared1": BASE,
    # MHA, two shared experts, no renormalisation, norm_head, biases
    "mha_shared2_normhead_bias": BASE.replace(
        num_key_value_heads=4,
        num_shared_experts=2,
        norm_topk_prob=False,
        norm_head=True,
        use_qkv_bias=True,
        use_bias=True,
        first_k_dense_replace=0,
    ),
    # zero-width shared MLP, top-1, tied embeddings, linear rope scaling
    "shared0_top1_tied_linear": BASE.replace(
        num_shared_experts=0,
        num_experts_per_tok=1,
        tie_word_embeddings=True,
        rope_scaling={"type": "linear", "factor": 2.0},
    ),
    # no shared MLP, head_dim with heads*head_dim != hidden, dynamic NTK past max_position_embeddings
    "noshared_headdim_dynamic": BASE.replace(
        num_shared_experts=None,
        head_dim=12,
        max_position_embeddings=8,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        num_experts=6,
        num_experts_per_tok=3,
    ),
}


def _tokens(cfg, b=2, t=11, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t))


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_numpy_reference(tmp_path, name):
    cfg = CASES[name]
    model = randomize_np(abstract_model(cfg), seed=2)
    toks = _tokens(cfg)
    ours = logits(model, toks)
    out = save_pretrained(model, str(tmp_path / "hf"), dtype="float32", max_shard_size="20KB")
    c = json.load(open(os.path.join(out, "config.json")))
    sd = ref.load_state_dict(out)
    want = ref.forward(c, sd, toks)
    assert np.max(np.abs(ours - want)) < 1e-4
    for impl in ("dense", "ragged"):
        loaded, _ = load_pretrained(out, moe_impl=impl)
        got = logits(loaded, toks)
        assert np.max(np.abs(got - want)) < 1e-4, impl


def test_left_padding_matches_reference(tmp_path):
    cfg = CASES["gqa_dense_first_shared1"]
    model = randomize_np(abstract_model(cfg), seed=4)
    toks = _tokens(cfg, b=3, t=9, seed=5)
    mask = np.ones_like(toks)
    mask[0, :4] = 0
    mask[2, :1] = 0
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = logits(model, toks, pos, mask)
    out = save_pretrained(model, str(tmp_path / "hf"), dtype="float32")
    want = ref.forward(json.load(open(os.path.join(out, "config.json"))), ref.load_state_dict(out), toks, mask)
    real = mask.astype(bool)
    assert np.max(np.abs(ours[real] - want[real])) < 1e-4


def test_config_json_round_trips_unchanged(tmp_path):
    published = ModelConfig().to_hf_dict()
    published.update(
        {
            "embedding_dropout": 0.0,
            "output_dropout": 0.0,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.36.0",
            "norm_softmax": False,
        }
    )
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(published))).to_hf_dict()
    assert again == published


def test_bfloat16_export_round_trip(tmp_path):
    cfg = BASE
    model = randomize_np(abstract_model(cfg), seed=2)
    out = save_pretrained(model, str(tmp_path / "hf"), dtype="bfloat16")
    sd = ref.load_state_dict(out)
    loaded, _ = load_pretrained(out)
    want = ref.forward(json.load(open(os.path.join(out, "config.json"))), sd, _tokens(cfg))
    got = logits(loaded, _tokens(cfg))
    assert np.max(np.abs(got - want)) < 1e-4  # same bf16-rounded weights on both sides
    ours = logits(model, _tokens(cfg))
    assert np.max(np.abs(ours - want)) < 0.05 * np.max(np.abs(want))  # only bf16 weight rounding differs
