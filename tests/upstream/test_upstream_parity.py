"""Parity with the real upstream modeling_bailing_moe.py (PyTorch, trust_remote_code).

Runs when RING_JAX_UPSTREAM_DIR names a folder holding the upstream modeling_bailing_moe.py and
configuration_bailing_moe.py (inclusionAI's Ling or Ring repository, models/), and RING_JAX_UPSTREAM_PYTHON names
an interpreter with torch and transformers 4.46 (default: this one).  Skipped, saying why, otherwise.  CI checks
parity on every run against tests/numpy_reference.py instead.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ring_jax.hf import load_pretrained, save_pretrained
from ring_jax.model import build_model
from tests.helpers import randomize
from tests.model.test_hf_parity import CASES

UPSTREAM = os.environ.get("RING_JAX_UPSTREAM_DIR")
PY = os.environ.get("RING_JAX_UPSTREAM_PYTHON", sys.executable)
RUNNER = os.path.join(os.path.dirname(__file__), "runner.py")


def _why_skip():
    if not UPSTREAM:
        return "RING_JAX_UPSTREAM_DIR is not set (point it at the folder holding modeling_bailing_moe.py)"
    if not os.path.exists(os.path.join(UPSTREAM, "modeling_bailing_moe.py")):
        return f"{UPSTREAM} holds no modeling_bailing_moe.py"
    r = subprocess.run([PY, "-c", "import torch, transformers"], capture_output=True)
    if r.returncode:
        return f"{PY} cannot import torch and transformers (set RING_JAX_UPSTREAM_PYTHON)"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))


def _run(*args):
    r = subprocess.run([PY, RUNNER, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("name", list(CASES))
def test_upstream_loads_our_export(tmp_path, name):
    cfg = CASES[name]
    model = randomize(build_model(cfg, seed=1), seed=2)
    hf = save_pretrained(model, str(tmp_path / "hf"), dtype="float32")
    ids = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    np.savez(tmp_path / "in.npz", ids=ids, mask=mask, generate=6)
    _run("logits", UPSTREAM, hf, tmp_path / "in.npz", tmp_path / "out.npz")
    want = np.load(tmp_path / "out.npz")
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    loaded, _ = load_pretrained(hf)
    got = np.asarray(loaded(ids, pos, mask).logits)
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - want["logits"][real])) < 1e-4
    if cfg.rope_scaling and cfg.rope_scaling.get("type") == "dynamic":
        return  # the engine caps contexts at max_position_embeddings; dynamic NTK is about exceeding it
    # greedy generation: the engine (KV cache, left padding handled by per-row positions) equals upstream generate
    from ring_jax.sampling import SamplingEngine, SamplingParams

    prompts = [[int(t) for t, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask)]
    comps = SamplingEngine.from_model(loaded, num_slots=2).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    )
    np.testing.assert_array_equal(np.stack([c.token_ids for c in comps]), want["generated"])


@pytest.mark.parametrize("name", ["gqa_dense_first_shared1", "mha_shared2_normhead_bias"])
def test_we_load_upstream_checkpoint(tmp_path, name):
    cfg = CASES[name]
    (tmp_path / "cfg").mkdir()
    json.dump(cfg.to_hf_dict(), open(tmp_path / "cfg" / "config.json", "w"))
    _run("init", UPSTREAM, tmp_path / "cfg" / "config.json", tmp_path / "up")
    ids = np.random.default_rng(1).integers(2, cfg.vocab_size, (2, 9))
    np.savez(tmp_path / "in.npz", ids=ids, mask=np.ones_like(ids), generate=0)
    _run("logits", UPSTREAM, tmp_path / "up", tmp_path / "in.npz", tmp_path / "out.npz")
    loaded, _ = load_pretrained(str(tmp_path / "up"))
    got = np.asarray(loaded(ids).logits)
    assert np.max(np.abs(got - np.load(tmp_path / "out.npz")["logits"])) < 1e-4
