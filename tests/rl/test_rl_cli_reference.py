"""ring-jax-rl --resume with beta > 0 from the two non-preset sources of the initial policy, in subprocesses (tiny
model, dense MoE, a compilation cache shared by the module's runs): the KL reference is rebuilt from the
--init_ckpt checkpoint or the --hf_dir directory recorded in <out_dir>/init.json -- the initial policy, not the
restored parameters -- and a reference that does not match the recorded checksums stops the run in one line
before anything is trained.  (The preset + seed source: tests/rl/test_rl_cli.py's SIGKILL + --resume test.)"""

import json
import os
import shutil

import numpy as np
import pytest

from tests.train.cli_run import cli, cli_env, error_lines, finish, records

# one C3PO update per step; --skip_no_signal=false so the untrained model's step 1 moves the parameters (and the KL
# of step 2 to the initial policy is > 0) although it never solves a task; lr 1e-2 at once (no warm-up) makes that
# KL large beside the ~0 a reference equal to the restored parameters would give
BASE = [
    "--moe_impl=dense",
    "--sampling_moe_impl=dense",
    "--tasks=chain_sum",
    "--num_prompts=40",
    "--prompts_per_step=2",
    "--samples_per_prompt=4",
    "--budget=24",
    "--max_new_tokens=8",
    "--seq_len=128",
    "--num_slots=8",
    "--lr=1e-2",
    "--warmup_steps=0",
    "--beta=0.05",
    "--skip_no_signal=false",
    "--ckpt_every=1",
    "--keep=10",
    "--progress_bar=false",
]


def rl(args, env):
    return cli("ring_jax.cli.rl", BASE + args, env)


def _sums(params):
    from ring_jax.train.checkpoint import tree_checksums

    return [int(v) for v in np.asarray(tree_checksums(params))]


def _ckpt_sums(run, step):
    from ring_jax.train.checkpoint import Checkpointer

    with Checkpointer(os.path.join(run, "ckpt"), read_only=True) as c:
        return c.read_meta(step)["checksums"]["params"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """An "SFT" run (tokenizer + parameters-only checkpoint at step 3) and a Hugging Face directory (another model,
    with the tokenizer), both drawn with NumPy (nothing compiled), both unlike the preset's seed-0 init; and the
    checksums of each one's parameters."""
    from ring_jax.config import get_preset
    from ring_jax.data import train_bpe
    from ring_jax.data.tasks import make_task_records
    from ring_jax.hf import save_pretrained
    from ring_jax.model.transformer import abstract_model
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.step import split_model
    from tests.helpers import numpy_params
    from tests.sampling.models import random_model

    root = tmp_path_factory.mktemp("sources")
    recs = make_task_records("chain_sum", 200, seed=1)
    tok = train_bpe([r["prompt"] + "\n" + r["solution"] for r in recs], vocab_size=300)
    tok.save(str(root / "sft" / "tokenizer"))
    cfg = get_preset("tiny").replace(vocab_size=320)
    _, _, abstract = split_model(abstract_model(cfg))
    sft = numpy_params(abstract, seed=0, scale=0.05)
    with Checkpointer(str(root / "sft" / "ckpt")) as c:
        c.save(3, params=sft, meta={"model_config": cfg.to_hf_dict()}, wait=True)
    model = random_model(cfg, seed=7, scale=0.05)
    hf = save_pretrained(model, str(root / "hf"), tokenizer=tok, dtype="float32")
    return {"sft": str(root / "sft"), "sft_sums": _sums(sft), "hf": hf, "hf_sums": _sums(split_model(model)[2])}


def _runs(args, env, root):
    """(a run of step 1 only, ckpt/1 written: the tests resume copies of it; the same run for 2 steps
    uninterrupted).  One after the other: the second loads the first's compilations from the cache."""
    out = []
    for n in (1, 2):
        rc, _, err = finish(rl(args + [f"--steps={n}", f"--out_dir={root / str(n)}"], env), 400)
        assert rc == 0, err[-3000:]
        out.append(str(root / str(n)))
    return tuple(out)


@pytest.fixture(scope="module")
def ckpt_run(sources, env, tmp_path_factory):
    return _runs([f"--init_ckpt={sources['sft']}"], env, tmp_path_factory.mktemp("rl_ckpt"))


@pytest.fixture(scope="module")
def hf_run(sources, env, tmp_path_factory):
    return _runs([f"--hf_dir={sources['hf']}"], env, tmp_path_factory.mktemp("rl_hf"))


def _resume_and_check(runs, args, want_sums, tmp_path, env):
    """Resume a copy of the 1-step run for step 2: it succeeds, its reference is the initial policy (init.json's
    checksums, which the run checks the rebuilt reference against, are ``want_sums``: the source's parameters, not
    step 1's), step 2's first update sees a KL well above 0 (a reference re-anchored on the restored parameters
    gives exactly 0 there: the policy and the reference are then the same), and step 2's loss and KL equal the
    uninterrupted run's bit for bit."""
    run1, full = runs
    run = str(tmp_path / "run")
    shutil.copytree(run1, run)
    init = json.load(open(os.path.join(run, "init.json")))
    assert init["params_checksums"] == want_sums
    assert _ckpt_sums(run, 1) != want_sums  # (not vacuous: step 1 moved the parameters)
    rc, out, err = finish(rl(args + ["--steps=2", f"--out_dir={run}", "--resume"], env), 400)
    assert rc == 0, err[-3000:]
    assert "resumed from step 1 of" in out
    m = records(run)
    assert sorted(m) == [1, 2] and os.path.isdir(os.path.join(run, "ckpt", "2"))
    assert m[1]["update/1/kl"] < 1e-9  # step 1: the policy is the reference
    assert m[2]["update/1/kl"] > 1e-5, m[2]["update/1/kl"]
    want = records(full)[2]
    for k in ("loss", "kl", "update/1/kl", "grad_norm", "entropy", "reward_mean"):
        assert m[2][k] == want[k], (k, m[2][k], want[k])
    return init


def test_resume_rebuilds_the_kl_reference_from_the_init_ckpt(sources, ckpt_run, env, tmp_path):
    init = _resume_and_check(ckpt_run, [f"--init_ckpt={sources['sft']}"], sources["sft_sums"], tmp_path, env)
    assert init["init_ckpt"] == os.path.join(sources["sft"], "ckpt") and init["step"] == 3


def test_resume_rebuilds_the_kl_reference_from_the_hf_dir(sources, hf_run, env, tmp_path):
    init = _resume_and_check(hf_run, [f"--hf_dir={sources['hf']}"], sources["hf_sums"], tmp_path, env)
    assert init["hf_dir"] == os.path.abspath(sources["hf"]) and not init["init_ckpt"]


def test_resume_refuses_a_reference_that_does_not_match_the_checksums(sources, ckpt_run, env, tmp_path):
    """One recorded checksum changed: the rebuilt reference no longer matches init.json, so the resumed run stops
    with one error line naming the checksums, exit 1, and writes no checkpoint and no metrics (without the check it
    would train step 2)."""
    run = str(tmp_path / "run")
    shutil.copytree(ckpt_run[0], run)
    path = os.path.join(run, "init.json")
    init = json.load(open(path))
    init["params_checksums"][0] += 1
    with open(path, "w") as f:
        json.dump(init, f)
    before = open(os.path.join(run, "metrics.jsonl")).read()
    rc, _, err = finish(rl([f"--init_ckpt={sources['sft']}", "--steps=2", f"--out_dir={run}", "--resume"], env), 400)
    lines = error_lines(err)
    assert rc == 1 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and "checksums" in lines[0] and path in lines[0], lines
    assert sorted(os.listdir(os.path.join(run, "ckpt"))) == ["1"]
    assert open(os.path.join(run, "metrics.jsonl")).read() == before
