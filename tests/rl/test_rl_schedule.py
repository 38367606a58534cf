"""ring-jax-rl-schedule end to end in subprocesses (tiny model, one C3PO step per stage): reasoning RL then general
RL (ifeval), stage 2 starting exactly from stage 1's final parameters, finished stages skipped on a re-run; bad
stages files fail in one line before anything runs; the shipped two-stage config parses."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.flags import FAST_COMPILE
from tests.helpers import numpy_params

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE, PYTHONPATH=ROOT)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "ring_jax.cli.rl_schedule", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _params(ckpt_dir, step, cfg):
    from ring_jax.model.transformer import abstract_model
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.step import split_model

    _, _, abstract = split_model(abstract_model(cfg))
    with Checkpointer(str(ckpt_dir), read_only=True) as c:
        return c.restore_params(abstract, step=step).params


def _sums(params):
    from ring_jax.train.checkpoint import tree_checksums

    return [int(v) for v in np.asarray(tree_checksums(params))]


def test_two_stage_schedule_chains_checkpoints_and_resumes(tmp_path):
    from ring_jax.config import get_preset
    from ring_jax.data import train_bpe
    from ring_jax.data.tasks import make_task_records
    from ring_jax.model.transformer import abstract_model
    from ring_jax.rewards.ifeval_prompts import make_ifeval_records
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.step import split_model

    # an "SFT" run to start from: tokenizer + a parameters-only checkpoint (numpy init: no compilation here)
    recs = make_task_records("chain_sum", 200, seed=1)
    ifeval = make_ifeval_records(8, seed=0, max_constraints=1)
    tok = train_bpe(
        [r["prompt"] + "\n" + r["solution"] for r in recs] + [r["prompt"] for r in ifeval] * 4, vocab_size=300
    )
    tok.save(str(tmp_path / "sft" / "tokenizer"))
    cfg = get_preset("tiny").replace(vocab_size=320, moe_impl="dense")
    _, _, abstract = split_model(abstract_model(cfg))
    sft = numpy_params(abstract, seed=0, scale=0.05)
    with Checkpointer(str(tmp_path / "sft" / "ckpt")) as c:
        c.save(3, params=sft, meta={"model_config": cfg.to_hf_dict(), "runtime": {"moe_impl": "dense"}}, wait=True)
    with open(tmp_path / "ifeval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ifeval)

    stages = {
        "init_ckpt": str(tmp_path / "sft"),
        "common": {
            "sampling_moe_impl": "dense",
            "beta": 0,
            "steps": 1,
            "budget": 32,
            "prompts_per_step": 2,
            "samples_per_prompt": 2,
            "max_new_tokens": 8,
            "seq_len": 128,
            "num_slots": 4,
            "num_prompts": 8,
            "lr": 1e-2,
            "progress_bar": False,
            "skip_no_signal": False,
            "warmup_steps": 0,
        },
        "stages": [
            {"name": "reasoning", "flags": {"tasks": ["chain_sum"]}},
            {"name": "general", "flags": {"prompts_jsonl": str(tmp_path / "ifeval.jsonl")}},
        ],
    }
    (tmp_path / "stages.json").write_text(json.dumps(stages))
    out = tmp_path / "sched"
    args = [f"--stages={tmp_path / 'stages.json'}", f"--out_dir={out}"]

    r = _run(args + ["--stop_after=reasoning"])  # stage 1 only, as if the schedule had been interrupted there
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "reasoning" / "ckpt" / "1").is_dir() and not (out / "general").exists()

    r = _run(args)  # continues: stage 1 skipped, stage 2 from stage 1's final checkpoint
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reasoning: already done" in r.stdout and "checksums equal" in r.stdout, r.stdout
    init1 = json.loads((out / "reasoning" / "init.json").read_text())
    init2 = json.loads((out / "general" / "init.json").read_text())
    stage1 = _params(out / "reasoning" / "ckpt", 1, cfg)
    assert init1["params_checksums"] == _sums(sft)  # stage 1 started from the SFT checkpoint
    assert init2["init_ckpt"] == str(out / "reasoning" / "ckpt") and init2["step"] == 1
    assert init2["params_checksums"] == _sums(stage1)  # stage 2 started from stage 1's final parameters
    assert _sums(stage1) != _sums(sft)  # (not vacuous: stage 1's update moved the parameters)
    with Checkpointer(str(out / "general" / "ckpt"), read_only=True) as c:
        meta2 = c.read_meta(1)
    assert meta2["state_step"] == 1  # stage 2 made one update from a fresh train state (it did not carry stage 1's)
    m2 = [json.loads(x) for x in open(out / "general" / "metrics.jsonl")]
    assert m2[-1]["step"] == 1 and m2[-1]["reward/ifeval/count"] == 4  # general RL scored by the ifeval checks

    r = _run(args)  # everything done: both skipped, nothing recomputed
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("already done") == 2
    record = json.loads((out / "schedule.json").read_text())
    assert [s["status"] for s in record["stages"]] == ["skipped (done)", "skipped (done)"]


def test_bad_stages_files_fail_in_one_line(tmp_path):
    cases = {
        '{"stages": [': "not valid JSON",
        '{"stages": []}': "non-empty list",
        '{"stages": [{"name": "a", "flags": {"step": 3, "tasks": "chain_sum"}}]}': "Unknown command line flag 'step'",
        '{"stages": [{"name": "a", "flags": {"tasks": "chain_sum", "out_dir": "x"}}]}': "set by the schedule itself",
        '{"stages": [{"name": "a", "flags": {"prompts_jsonl": "no/such.jsonl"}}]}': "no such file",
    }
    for i, (text, msg) in enumerate(cases.items()):
        (tmp_path / f"s{i}.json").write_text(text)
        r = _run([f"--stages={tmp_path / f's{i}.json'}", f"--out_dir={tmp_path / 'out'}"], timeout=60)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.strip().count("\n") == 0, (text, r.stderr)
    assert not (tmp_path / "out").exists()  # nothing started


def test_shipped_two_stage_config_parses():
    r = _run(
        ["--stages=experiments/flags/rl_two_stage_small_cpu.json", "--out_dir=/nonexistent/x", "--dry_run"], timeout=60
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and "--init_ckpt=/nonexistent/x/reasoning/ckpt:40" in lines[1]
    assert "--prompts_jsonl=experiments/data/ifeval_small.jsonl" in lines[1] and "--tasks= " in lines[1]
