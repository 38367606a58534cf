"""ring-jax-sft: supervised fine-tuning (long-CoT SFT of Ring-lite) with checkpoints, resume and pre-emption.

    ring-jax-sft --flagfile=experiments/flags/sft_small_cpu.flags --out_dir=runs/sft_small
    ring-jax-sft --preset=tiny --synthetic_corpus=400 --steps=8 --ckpt_every=2 --out_dir=/tmp/run   # no data
    ring-jax-sft ... --resume          # continue from the newest readable checkpoint in --out_dir/ckpt

Run directory (--out_dir): ``ckpt/`` (orbax steps), ``tokenizer/`` (the tokenizer used, trained here when
--tokenizer is not given), ``config.json`` (the model's HF config), ``metrics.jsonl`` + TensorBoard events,
``data/synthetic.jsonl`` (with --synthetic_corpus).  Export a checkpoint with ``ring-jax-export``.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from ring_jax.cli import common
from ring_jax.cli.common import usage
from ring_jax.cli.run import TrainRun

FLAGS = flags.FLAGS


def define_flags() -> None:
    common.define_model_flags("small")
    common.define_runtime_flags()
    flags.DEFINE_string("train_jsonl", "", "SFT chat records (JSONL path, directory or glob)")
    flags.DEFINE_integer("synthetic_corpus", 0, "generate this many toy arithmetic records instead of --train_jsonl")
    flags.DEFINE_float("max_bad_fraction", 0.05, "fail when more than this fraction of records is unusable")
    flags.DEFINE_string(
        "tokenizer",
        "",
        "tokenizer directory / tokenizer.json / .model; default: the --hf_dir's, "
        "the run's own (resume), or a BPE trained on the corpus",
    )
    flags.DEFINE_integer("seq_len", 256, "packed row length")
    flags.DEFINE_integer("global_batch", 8, "rows per step over all processes")
    flags.DEFINE_integer("micro_batches", 1, "micro-batches per step (gradient accumulation)")
    flags.DEFINE_integer("steps", 0, "steps to train (0: derive from --epochs)")
    flags.DEFINE_integer("epochs", 0, "passes over the packed rows (0 with --steps 0: one epoch)")
    flags.DEFINE_integer("data_seed", 0, "shuffling / packing seed")
    flags.DEFINE_float("lr", 3e-4, "peak learning rate")
    flags.DEFINE_enum("schedule", "cosine", ["cosine", "constant"], "warm-up + cosine decay, or warm-up + constant")
    flags.DEFINE_float("warmup_ratio", 0.01, "warm-up length as a fraction of the steps")
    flags.DEFINE_integer("warmup_steps", -1, "warm-up length in steps (overrides --warmup_ratio when >= 0)")
    flags.DEFINE_float("end_lr_ratio", 0.1, "cosine floor as a fraction of --lr")
    flags.DEFINE_float("b1", 0.9, "Adam beta1")
    flags.DEFINE_float("b2", 0.95, "Adam beta2")
    flags.DEFINE_float("eps", 1e-8, "Adam epsilon")
    flags.DEFINE_float("weight_decay", 0.1, "decoupled weight decay (not on norms / 1-D parameters)")
    flags.DEFINE_float("clip_norm", 1.0, "global gradient-norm clipping (<= 0: off)")
    flags.DEFINE_float("alpha_bal", 1e-5, "MoE load-balance loss weight")
    flags.DEFINE_float("alpha_z", 1e-7, "router z-loss weight")
    flags.DEFINE_integer("ce_chunk", 0, "cross-entropy over this many positions at a time (0: full logits)")
    common.define_run_flags(out_dir="runs/sft", ckpt_every=100, keep=3, max_nonfinite=10)
    flags.DEFINE_integer("log_every", 1, "write metrics every N steps")
    flags.DEFINE_float("peak_flops", -1.0, "device peak FLOP/s for MFU (-1: measure a matmul at start; 0: no MFU)")


def _check_flags(dp: int, processes: int) -> None:
    if FLAGS.steps < 0 or FLAGS.epochs < 0:
        usage("--steps and --epochs must be >= 0")
    if FLAGS.steps and FLAGS.epochs:
        usage("give --steps or --epochs, not both")
    if FLAGS.micro_batches < 1:
        usage(f"--micro_batches must be >= 1, got {FLAGS.micro_batches}")
    if FLAGS.global_batch < 1 or FLAGS.global_batch % (dp * FLAGS.micro_batches):
        usage(
            f"--global_batch={FLAGS.global_batch} must be a positive multiple of data-parallel size {dp} x "
            f"--micro_batches {FLAGS.micro_batches} = {dp * FLAGS.micro_batches}"
        )
    if FLAGS.global_batch % processes:
        usage(f"--global_batch={FLAGS.global_batch} must be divisible by the process count {processes}")
    if FLAGS.seq_len < 2:
        usage("--seq_len must be >= 2")
    if bool(FLAGS.train_jsonl) == bool(FLAGS.synthetic_corpus):
        usage("give exactly one of --train_jsonl and --synthetic_corpus")
    if FLAGS.ckpt_every < 0:
        usage("--ckpt_every must be >= 0")


def main(argv: list[str]) -> None:
    common.start_main(argv)
    import jax

    from ring_jax.data import DataError, train_bpe
    from ring_jax.data.pipeline import make_sft_dataset
    from ring_jax.data.synthetic import arithmetic_records, corpus_texts, write_jsonl
    from ring_jax.train.loop import LoopConfig
    from ring_jax.train.losses import LossConfig, sft_loss_fn
    from ring_jax.train.metrics import flops_per_token, measure_matmul_peak
    from ring_jax.train.optim import OptimConfig
    from ring_jax.train.step import data_parallel_size, global_batch, make_train_step

    run = TrainRun.from_flags()
    dp = data_parallel_size(run.mesh)
    _check_flags(dp, jax.process_count())
    try:
        optim_cfg = common.dataclass_from_flags(OptimConfig)
    except ValueError as e:
        usage(str(e))
    run.check_resume()

    # ---- data and tokenizer
    if FLAGS.synthetic_corpus:
        records = arithmetic_records(FLAGS.synthetic_corpus, seed=FLAGS.data_seed)
        if run.chief:
            write_jsonl(records, os.path.join(run.out_dir, "data", "synthetic.jsonl"))
        source = records
    else:
        source, records = FLAGS.train_jsonl, None
    tok = run.find_tokenizer()
    if tok is None:  # a BPE tokenizer trained on the corpus
        if records is None and not FLAGS.hf_dir and not FLAGS.init_ckpt:
            from ring_jax.data.jsonl import iter_records

            records = [r for _, _, r in iter_records(source)]  # corpus_texts keeps only the usable ones
        vocab = run.cfg.vocab_size if run.cfg.vocab_size >= 320 else 384
        logging.info("training a %d-token BPE tokenizer on the corpus", vocab)
        tok = train_bpe(corpus_texts(records), vocab_size=vocab)
    run.use_tokenizer(tok)
    try:
        ds, info = make_sft_dataset(
            source,
            tok,
            FLAGS.seq_len,
            FLAGS.global_batch,
            seed=FLAGS.data_seed,
            num_epochs=None if FLAGS.steps else (FLAGS.epochs or 1),
            max_bad_fraction=0.5 if FLAGS.synthetic_corpus else FLAGS.max_bad_fraction,
        )
    except (DataError, ValueError, FileNotFoundError) as e:
        common.die(f"data: {e}")
    total_steps = FLAGS.steps or info.shard.num_batches
    if total_steps < 1:
        common.die("data: not a single batch")
    logging.info(
        "data: %d rows of %d tokens, %d steps of %d rows",
        info.shard.num_items,
        FLAGS.seq_len,
        total_steps,
        FLAGS.global_batch,
    )

    # ---- model, optimizer, state, loop
    run.build(optim_cfg, total_steps)
    it = iter(ds)
    with run.checkpointer() as ckpt:
        state, start_step = run.restore_or_init(ckpt, it)
        step_fn = make_train_step(
            run.graphdef,
            sft_loss_fn(common.dataclass_from_flags(LossConfig)),
            run.optimizer,
            run.mesh,
            run.shardings,
            FLAGS.micro_batches,
            schedule=run.schedule,
        )
        peak = FLAGS.peak_flops
        if peak < 0:
            peak = measure_matmul_peak(run.cfg.dtype) * jax.device_count()
            logging.info("measured matmul peak: %.1f GFLOP/s (all devices)", peak / 1e9)
        result = run.train(
            step_fn,
            state,
            it,
            start_step=start_step,
            ckpt=ckpt,
            desc="sft",
            loop_cfg=common.dataclass_from_flags(LoopConfig, total_steps=total_steps),
            meta={"seq_len": FLAGS.seq_len, "global_batch": FLAGS.global_batch, "micro_batches": FLAGS.micro_batches},
            writer_kw={"peak_flops": peak or None, "flops_per_token": flops_per_token(run.cfg, FLAGS.seq_len)},
            to_device=lambda b: global_batch(b, run.mesh),
            tokens_per_step=FLAGS.global_batch * FLAGS.seq_len,
        )
    run.exit_if_preempted(result)
    if run.chief:
        print(
            f"done: step {result.step}, loss {result.last_metrics.get('loss', float('nan')):.4f}; "
            f"checkpoints in {run.ckpt_dir}",
            flush=True,
        )


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
