"""Bad input to the training CLIs fails in one ``error: ...`` line (no traceback) and leaves the disk consistent:
a malformed SFT record without --tokenizer is skipped like the reader skips it; a damaged config.json or safetensors
shard is named; ring-jax-import refuses a non-empty --out_dir unless --overwrite; --resume over a run whose
checkpoints are all unreadable (or all quarantined) refuses, moves nothing, and never starts from scratch.

Subprocesses (one CPU device, the session's compilation cache: tests/train/conftest.py); those that fail before
compiling run concurrently."""

import json
import os
import shutil

import pytest

from ring_jax.config import get_preset
from ring_jax.data.synthetic import arithmetic_records
from ring_jax.hf import load_pretrained, save_pretrained
from tests.sampling.models import random_model
from tests.train.cli_run import BASE, cli, error_lines, finish, sft
from tests.train.test_checkpoint import damage

BAD_MESSAGES = [{"messages": "hi"}, {"messages": [{"role": "user", "content": 3}]}]
TEARDOWN_NOISE = ("Traceback", "Event loop is closed", "exception was never retrieved", "Exception ignored")


def assert_one_error_line(rc, err, code, *phrases):
    """Exit status ``code``; stderr, apart from absl INFO/WARNING records, is one ``error:`` line with ``phrases``."""
    lines = error_lines(err)
    assert rc == code and not any(n in err for n in TEARDOWN_NOISE), err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert all(p in lines[0] for p in phrases), (phrases, lines[0])


def run_all(cmds, env):
    """Start ``(module, args)`` commands at once; their ``(rc, stdout, stderr)`` in order."""
    procs = [cli(module, args, env) for module, args in cmds]
    return [finish(p, 180) for p in procs]


def write_records(path, good: int, bad: int) -> list[int]:
    """``bad`` of BAD_MESSAGES (in turn) after each of the first ``bad`` of ``good`` arithmetic records, so the
    reader's first logged warnings name them; returns their line numbers."""
    lines, bad_lines = [], []
    for i, rec in enumerate(arithmetic_records(good)):
        lines.append(json.dumps(rec))
        if i < bad:
            lines.append(json.dumps(BAD_MESSAGES[i % len(BAD_MESSAGES)]))
            bad_lines.append(len(lines))
    path.write_text("\n".join(lines) + "\n")
    return bad_lines


def steps_in(ckpt_dir) -> list[int]:
    return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []


# --------------------------------------------------------------------------------- 1: SFT records, no --tokenizer
def test_sft_without_tokenizer_skips_bad_messages(uninterrupted, env, tmp_path):
    """The BPE tokenizer trained on the corpus skips malformed ``messages`` (was: AttributeError in corpus_texts);
    the reader then reports each bad line by file:line, as it does with --tokenizer, and the run trains (after the
    shared ``uninterrupted`` run, whose compiled program it loads from the cache: same shapes and step count)."""
    data = tmp_path / "train.jsonl"
    bad_lines = write_records(data, 300, bad=2)
    run = tmp_path / "run"
    args = [a for a in BASE if not a.startswith(("--synthetic_corpus", "--ckpt_every"))]  # same compiled program
    rc, out, err = finish(
        sft(args + [f"--train_jsonl={data}", "--max_bad_fraction=0.2", "--ckpt_every=0", f"--out_dir={run}"], env)
    )
    assert rc == 0 and error_lines(err) == [] and "done: step 8" in out, err[-3000:]
    for n in bad_lines:
        assert f"skipping bad record {data}:{n}: bad_messages" in err, err[-3000:]
    assert os.path.isfile(run / "tokenizer" / "tokenizer.json") and steps_in(run / "ckpt") == [8]


def test_sft_without_tokenizer_too_many_bad_is_one_line(env, tmp_path):
    data = tmp_path / "train.jsonl"
    write_records(data, 10, bad=10)
    [(rc, _, err)] = run_all(
        [
            (
                "ring_jax.cli.sft",
                ["--preset=tiny", f"--train_jsonl={data}", "--peak_flops=0", f"--out_dir={tmp_path / 'run'}"],
            )
        ],
        env,
    )
    assert_one_error_line(rc, err, 1, "error: data: ", "'bad_messages': 10", f"{data}:2")
    assert steps_in(tmp_path / "run" / "ckpt") == []


# --------------------------------------------------------------------------------- 2, 3: HF directories
@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """Two tiny HF directories of different models whose config.json files differ too."""
    root = tmp_path_factory.mktemp("hf")
    cfg = get_preset("tiny")
    return [
        save_pretrained(random_model(c, seed=i), str(root / name), dtype="float32")
        for i, (name, c) in enumerate([("a", cfg), ("b", cfg.replace(rms_norm_eps=1e-5))])
    ]


def test_damaged_hf_directory_names_the_file(hf_pair, env, tmp_path):
    """Non-JSON config.json (was: JSONDecodeError traceback) and a safetensors shard cut to half its bytes (was:
    SafetensorError traceback) are one line naming the file, from ring-jax-import and ring-jax-sample."""
    bad_cfg, cut = str(tmp_path / "bad_cfg"), str(tmp_path / "cut")
    shutil.copytree(hf_pair[0], bad_cfg)
    shutil.copytree(hf_pair[0], cut)
    with open(os.path.join(bad_cfg, "config.json"), "w") as f:
        f.write("{not json")
    shard = next(os.path.join(cut, n) for n in sorted(os.listdir(cut)) if n.endswith(".safetensors"))
    os.truncate(shard, os.path.getsize(shard) // 2)
    cases = [
        (
            "ring_jax.cli.import_ckpt",
            [f"--hf_dir={bad_cfg}", f"--out_dir={tmp_path}/o1"],
            (os.path.join(bad_cfg, "config.json"), "not valid JSON"),
        ),
        (
            "ring_jax.cli.import_ckpt",
            [f"--hf_dir={cut}", f"--out_dir={tmp_path}/o2"],
            (shard, "unreadable safetensors file"),
        ),
        (
            "ring_jax.cli.sample",
            [f"--hf_dir={cut}", "--prompt_ids=1,2", "--max_new_tokens=1"],
            (shard, "unreadable safetensors file"),
        ),
    ]
    for (_, _, phrases), (rc, _, err) in zip(cases, run_all([c[:2] for c in cases], env)):
        assert_one_error_line(rc, err, 1, *phrases)
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o2")  # nothing half-written


def imported(out_dir):
    """(meta of ckpt/0, config.json) of an imported run directory."""
    from ring_jax.train.checkpoint import Checkpointer

    with Checkpointer(os.path.join(out_dir, "ckpt"), read_only=True) as ck:
        meta = ck.read_meta(0)
    with open(os.path.join(out_dir, "config.json")) as f:
        return meta, json.load(f)


def test_import_refuses_a_non_empty_out_dir_unless_overwrite(hf_pair, env, tmp_path):
    """A second import into the same --out_dir used to exit 0 with ckpt/0 still the first model and config.json the
    second; now it is a usage error, and --overwrite replaces everything."""
    import jax
    import numpy as np

    from ring_jax.cli.import_ckpt import import_hf
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.step import split_model

    a, b = (os.path.abspath(d) for d in hf_pair)
    out = str(tmp_path / "run")
    import_hf(a, out)
    open(os.path.join(out, "stale.txt"), "w").close()
    [(rc, _, err)] = run_all([("ring_jax.cli.import_ckpt", [f"--hf_dir={b}", f"--out_dir={out}"])], env)
    assert_one_error_line(rc, err, 2, "is not empty", "--overwrite")
    meta, config = imported(out)
    assert meta["source"] == a and config["rms_norm_eps"] == 1e-6  # untouched
    [(rc, _, err)] = run_all([("ring_jax.cli.import_ckpt", [f"--hf_dir={b}", f"--out_dir={out}", "--overwrite"])], env)
    assert rc == 0, err[-3000:]
    meta, config = imported(out)
    assert meta["source"] == b and config["rms_norm_eps"] == meta["model_config"]["rms_norm_eps"] == 1e-5
    assert not os.path.exists(os.path.join(out, "stale.txt")) and steps_in(os.path.join(out, "ckpt")) == [0]
    _, _, want = split_model(load_pretrained(b)[0])
    with Checkpointer(os.path.join(out, "ckpt"), read_only=True) as ck:
        got = ck.restore_params(want).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


# --------------------------------------------------------------------------------- 4: --resume, no usable checkpoint
def test_resume_with_every_checkpoint_unreadable_moves_nothing(uninterrupted, env, tmp_path):
    """All steps damaged: exit 1 in one line, without the tensorstore teardown tracebacks; no step is moved to
    ckpt.corrupt/ (they used to be, and the next --resume then started from scratch), so --resume keeps refusing."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    ckpt = run / "ckpt"
    steps = steps_in(ckpt)
    for s in steps:
        damage(str(ckpt / str(s)), "truncate")
    [(rc, _, err)] = run_all([("ring_jax.cli.sft", BASE + [f"--out_dir={run}", "--resume"])], env)
    assert_one_error_line(rc, err, 1, "no readable checkpoint", "nothing was moved")
    assert steps_in(ckpt) == steps == [2, 4, 6, 8] and not os.path.exists(f"{ckpt}.corrupt")


def test_resume_over_only_quarantined_checkpoints_refuses(uninterrupted, env, tmp_path):
    """ckpt/ empty but ckpt.corrupt/ full (what the old quarantine-everything left): --resume is exit 1 and a
    fresh start exit 2, both one line; neither trains over the run (it used to start from scratch)."""
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    os.makedirs(run / "ckpt.corrupt")
    for s in steps_in(run / "ckpt"):
        os.rename(run / "ckpt" / str(s), run / "ckpt.corrupt" / f"{s}-1")
    metrics = (run / "metrics.jsonl").read_text()
    results = run_all([("ring_jax.cli.sft", BASE + [f"--out_dir={run}", *flag]) for flag in (["--resume"], [])], env)
    for code, (rc, _, err) in zip((1, 2), results):
        assert_one_error_line(rc, err, code, "refusing to start from scratch", f"{run}/ckpt.corrupt")
    assert steps_in(run / "ckpt") == [] and (run / "metrics.jsonl").read_text() == metrics
