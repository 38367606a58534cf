"""ring-jax-sft-entropy: the entropy of every SFT checkpoint on the RL prompts, and the one RL should start from.

Ring-lite picks its RL start point among SFT checkpoints by the policy's entropy (a 0.3-0.5 nats band at 16.8B),
not by validation accuracy.  For each checkpoint of an ``ring-jax-sft`` run this samples ``--samples`` responses to
``--prompts`` RL prompts at temperature 1 and measures the mean per-token entropy (``ring_jax.rl.probe``), counts
the SFT loss tokens trained up to it (from the run's ``metrics.jsonl``), and writes ``checkpoints.json`` in the form
``ring-jax-token-efficiency --input`` reads, with the pick (``token_efficiency.pick_checkpoint``) in it:

    ring-jax-sft-entropy --sft_dir=runs/pipeline/sft --prompts_jsonl=runs/pipeline/data/rl_prompts.jsonl
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags

from ring_jax.cli import common
from ring_jax.cli.common import usage

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("sft_dir", None, "ring-jax-sft run folder (ckpt/, metrics.jsonl, tokenizer/)")
    flags.DEFINE_string("prompts_jsonl", None, "RL prompt records (JSONL) the entropy is measured on")
    flags.DEFINE_string("tokenizer", "", "tokenizer path; default: <sft_dir>/tokenizer")
    flags.DEFINE_integer("prompts", 64, "prompts sampled (a seeded draw from the file)")
    flags.DEFINE_integer("samples", 4, "responses per prompt (T = 1, top-p 1)")
    flags.DEFINE_integer("max_new_tokens", 64, "response length limit")
    flags.DEFINE_integer("seq_len", 256, "row length the responses are scored in")
    flags.DEFINE_integer("num_slots", 256, "engine slots")
    flags.DEFINE_integer("seed", 0, "sampling seed (the same for every checkpoint)")
    flags.DEFINE_float("entropy_low", 0.3, "lower edge of the entropy band")
    flags.DEFINE_float("entropy_high", 0.5, "upper edge of the entropy band")
    flags.DEFINE_string("out", "", "output JSON; default: <sft_dir>/checkpoints.json")
    flags.mark_flags_as_required(["sft_dir", "prompts_jsonl"])


def sft_tokens_by_step(metrics_path: str) -> dict[int, float]:
    """Cumulative SFT loss tokens after each logged step (``ce_tokens``, else ``num_tokens``)."""
    from ring_jax.train.metrics import is_number, read_jsonl

    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"no SFT metrics at {metrics_path} (needed for each checkpoint's token count)")
    out, total = {}, 0.0
    for r in sorted(read_jsonl(metrics_path), key=lambda r: r.get("step", 0)):
        n = r.get("ce_tokens", r.get("num_tokens"))
        if is_number(n) and is_number(r.get("step")):
            total += float(n)
            out[int(r["step"])] = total
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")
    if FLAGS.prompts < 1 or FLAGS.samples < 1:
        usage("--prompts and --samples must be >= 1")
    if not FLAGS.entropy_low <= FLAGS.entropy_high:
        usage("--entropy_low must be <= --entropy_high")
    sft_dir = os.path.abspath(FLAGS.sft_dir)
    if not os.path.isdir(sft_dir):
        usage(f"--sft_dir: no such directory: {FLAGS.sft_dir}")
    if not os.path.isfile(FLAGS.prompts_jsonl):
        usage(f"--prompts_jsonl: no such file: {FLAGS.prompts_jsonl}")
    import numpy as np

    from ring_jax.cli.export import restore_model
    from ring_jax.cli.token_efficiency import pick_checkpoint
    from ring_jax.data import load_tokenizer
    from ring_jax.data.chat import ChatRenderer
    from ring_jax.data.jsonl import DataError, load_prompt_records
    from ring_jax.rl.probe import make_entropy_fn, rollout_entropy
    from ring_jax.train.checkpoint import Checkpointer, CheckpointError, resolve_ckpt_dir
    from ring_jax.train.step import split_model

    try:
        run_dir, ckpt_dir = resolve_ckpt_dir(sft_dir)
        with Checkpointer(ckpt_dir, read_only=True) as c:
            steps = c.all_steps()
        if not steps:
            common.die(f"--sft_dir: {FLAGS.sft_dir} holds no checkpoints (a ring-jax-sft run folder, or its ckpt/)")
        tokens = sft_tokens_by_step(os.path.join(run_dir, "metrics.jsonl"))
        tok = load_tokenizer(FLAGS.tokenizer or os.path.join(run_dir, "tokenizer"))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        common.die(str(e))
    missing = [s for s in steps if s not in tokens]
    if missing:
        common.die(f"{run_dir}/metrics.jsonl has no record of step(s) {missing}: cannot count their SFT tokens")
    try:
        recs, _ = load_prompt_records(
            FLAGS.prompts_jsonl, tokenizer=tok, max_prompt_tokens=FLAGS.seq_len - FLAGS.max_new_tokens
        )
    except DataError as e:
        common.die(f"--prompts_jsonl: {e}")
    if not recs:
        common.die(f"--prompts_jsonl: no usable prompt in {FLAGS.prompts_jsonl}")
    # a seeded draw over the whole file (the pipeline writes its families one after another)
    pick = np.random.default_rng(FLAGS.seed).choice(len(recs), size=min(FLAGS.prompts, len(recs)), replace=False)
    recs = [recs[i] for i in sorted(pick)]
    prompts = [r["prompt_ids"] for r in recs]
    stop_ids = ChatRenderer(tok).stop_ids
    rows, fn = [], None
    for s in steps:
        t0 = time.time()
        model, _, step = restore_model(ckpt_dir, s)
        graphdef, _, params = split_model(model)
        fn = fn or make_entropy_fn(graphdef)
        p = rollout_entropy(
            graphdef,
            params,
            prompts,
            n=FLAGS.samples,
            max_new_tokens=FLAGS.max_new_tokens,
            stop_ids=stop_ids,
            seed=FLAGS.seed,
            num_slots=FLAGS.num_slots,
            seq_len=FLAGS.seq_len,
            entropy_fn=fn,
        )
        rows.append(
            {
                "name": f"step{step}",
                "step": step,
                "ckpt": f"{ckpt_dir}:{step}",
                "sft_tokens": tokens[step],
                **p.as_dict(),
            }
        )
        print(
            f"step {step}: entropy {p.entropy:.4f} nats/token (sampled -log p {p.sampled_nll:.4f}), "
            f"{p.responses} responses, mean length {p.mean_length:.1f}, {tokens[step]:.0f} SFT tokens "
            f"({time.time() - t0:.0f}s)",
            flush=True,
        )
    band = (FLAGS.entropy_low, FLAGS.entropy_high)
    picked, why = pick_checkpoint(rows, band)
    out = FLAGS.out or os.path.join(run_dir, "checkpoints.json")
    common.write_json(
        out,
        {
            "checkpoints": rows,
            "picked": picked["name"],
            "picked_ckpt": picked["ckpt"],
            "rule": why,
            "entropy_band": list(band),
            "prompts": len(prompts),
            "samples": FLAGS.samples,
            "seed": FLAGS.seed,
        },
    )
    print(f"picked {picked['name']}: {why}\nwrote {out}", flush=True)


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    sys.exit(run())
