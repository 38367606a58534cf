"""Generation from a model loaded with ring_jax.hf.load_pretrained equals greedy decoding by the independent NumPy
reference; the ring-jax-sample CLI (subprocess) on a saved tiny HF directory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ring_jax.config import get_preset
from ring_jax.hf import load_pretrained, save_pretrained
from ring_jax.sampling import SamplingEngine, SamplingParams
from tests import numpy_reference as ref
from tests.sampling.models import random_model

CFG = get_preset("tiny")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = [[5, 6, 7, 8], [20, 21], [33, 34, 35, 36, 37, 38]]
STEPS = 5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = random_model(CFG, seed=1)
    return save_pretrained(model, str(tmp_path_factory.mktemp("sample") / "hf"), dtype="float32")


def test_loaded_model_greedy_equals_numpy_reference(hf_dir):
    model, _ = load_pretrained(hf_dir)
    eng = SamplingEngine.from_model(model, num_slots=4, chunk=4, cache_len=64)
    out = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=STEPS, ignore_eos=True))
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    sd = ref.load_state_dict(hf_dir)
    for comp, p in zip(out, PROMPTS):
        ids = list(p)
        for _ in range(STEPS):
            logits = ref.forward(c, sd, np.asarray([ids]))[0, -1]
            ids.append(int(np.argmax(logits)))
        assert comp.token_ids.tolist() == ids[len(p) :]
        # raw logprobs of the generated tokens against the float64 reference
        full = ref.forward(c, sd, np.asarray([ids]))[0, len(p) - 1 : -1]
        full = full - full.max(-1, keepdims=True)
        lsm = full - np.log(np.exp(full).sum(-1, keepdims=True))
        np.testing.assert_allclose(comp.raw_logprobs, lsm[np.arange(STEPS), ids[len(p) :]], atol=1e-4)


def _cli(*args, timeout=240):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "ring_jax.cli.sample", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_generates_and_writes_jsonl(hf_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in PROMPTS[:2]))
    out = tmp_path / "o.jsonl"
    r = _cli(
        "--hf_dir",
        hf_dir,
        "--prompts_jsonl",
        str(prompts),
        "--temperature",
        "0",
        "--max_new_tokens",
        str(STEPS),
        "--n",
        "2",
        "--ignore_eos",
        "--num_slots",
        "4",
        "--chunk",
        "2",
        "--output_jsonl",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["prompt_index"], x["sample_index"]) for x in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    model, _ = load_pretrained(hf_dir)
    want = SamplingEngine.from_model(model, num_slots=4, chunk=4, cache_len=64).generate(
        PROMPTS[:2], SamplingParams(temperature=0.0, max_new_tokens=STEPS, ignore_eos=True)
    )
    for x in recs:
        assert x["ids"] == want[x["prompt_index"]].token_ids.tolist()
        assert x["finish_reason"] == "length" and len(x["logprobs"]) == len(x["raw_logprobs"]) == STEPS
        assert x["text"] is None and x["prompt_ids"] == PROMPTS[x["prompt_index"]]
    # streamed per chunk (chunk 2, 5 tokens -> 3 chunks per sample)
    assert r.stdout.count("[0.0") == 3 and "[1.1 done]" in r.stdout


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--hf_dir", "/nonexistent/hf", "--prompt_ids", "1,2"], "checkpoint not found"),
        (["--checkpoint_dir", "/nonexistent/ckpt", "--prompt_ids", "1,2"], "checkpoint not found"),
        (["--prompt_ids", ""], "prompt 0 is empty"),
        (["--prompt_ids", ",".join(["3"] * 300)], "longer than the context"),
        (["--tokenizer", "/nonexistent/tokenizer.json", "--prompt", "hi"], "does not exist"),
    ],
    ids=["no_hf_dir", "no_ckpt", "empty", "too_long", "bad_tokenizer"],
)
def test_cli_bad_input_is_one_line_error(hf_dir, args, msg):
    if "--hf_dir" not in args and "--checkpoint_dir" not in args:
        args = ["--hf_dir", hf_dir, *args]
    r = _cli(*args, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and msg in last, r.stderr
