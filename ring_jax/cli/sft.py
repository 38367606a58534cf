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
import sys

from absl import app, flags, logging

from ring_jax.cli import common
from ring_jax.cli.common import usage

FLAGS = flags.FLAGS


def define_flags() -> None:
    common.define_model_flags("small")
    common.define_runtime_flags()
    flags.DEFINE_string("train_jsonl", "", "SFT chat records (JSONL path, directory or glob)")
    flags.DEFINE_integer("synthetic_corpus", 0, "generate this many toy arithmetic records instead of --train_jsonl")
    flags.DEFINE_float("max_bad_fraction", 0.05, "fail when more than this fraction of records is unusable")
    flags.DEFINE_string("tokenizer", "", "tokenizer directory / tokenizer.json / .model; default: the --hf_dir's, "
                        "the run's own (resume), or a BPE trained on the corpus")
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
    flags.DEFINE_integer("ckpt_every", 100, "checkpoint every N steps (0: only at the end)")
    flags.DEFINE_integer("keep", 3, "checkpoints to keep (0: all)")
    flags.DEFINE_bool("resume", False, "continue from the newest readable checkpoint in --out_dir/ckpt")
    flags.DEFINE_string("out_dir", "runs/sft", "run directory")
    flags.DEFINE_integer("max_nonfinite", 10, "stop after this many consecutive non-finite steps (0: never)")
    flags.DEFINE_integer("log_every", 1, "write metrics every N steps")
    flags.DEFINE_float("peak_flops", -1.0, "device peak FLOP/s for MFU (-1: measure a matmul at start; 0: no MFU)")
    flags.DEFINE_bool("progress_bar", True, "show the tqdm progress bar")
    flags.DEFINE_float("step_delay_s", 0.0, "testing aid: sleep after every step")


def _check_flags(dp: int, processes: int) -> None:
    if FLAGS.steps < 0 or FLAGS.epochs < 0:
        usage("--steps and --epochs must be >= 0")
    if FLAGS.steps and FLAGS.epochs:
        usage("give --steps or --epochs, not both")
    if FLAGS.micro_batches < 1:
        usage(f"--micro_batches must be >= 1, got {FLAGS.micro_batches}")
    if FLAGS.global_batch < 1 or FLAGS.global_batch % (dp * FLAGS.micro_batches):
        usage(f"--global_batch={FLAGS.global_batch} must be a positive multiple of data-parallel size {dp} x "
              f"--micro_batches {FLAGS.micro_batches} = {dp * FLAGS.micro_batches}")
    if FLAGS.global_batch % processes:
        usage(f"--global_batch={FLAGS.global_batch} must be divisible by the process count {processes}")
    if FLAGS.seq_len < 2:
        usage("--seq_len must be >= 2")
    if bool(FLAGS.train_jsonl) == bool(FLAGS.synthetic_corpus):
        usage("give exactly one of --train_jsonl and --synthetic_corpus")
    if FLAGS.ckpt_every < 0:
        usage("--ckpt_every must be >= 0")


def _tokenizer(out_dir: str, records, cfg, chief: bool, init_run: str = ""):
    from ring_jax.data import load_tokenizer, train_bpe
    from ring_jax.data.synthetic import corpus_texts

    own = os.path.join(out_dir, "tokenizer")
    path = FLAGS.tokenizer or (FLAGS.hf_dir if FLAGS.hf_dir and _has_tokenizer(FLAGS.hf_dir) else "")
    if not path and _has_tokenizer(own):
        path = own
    if not path and init_run and _has_tokenizer(os.path.join(init_run, "tokenizer")):
        path = os.path.join(init_run, "tokenizer")
    if path:
        try:
            tok = load_tokenizer(path)
        except (FileNotFoundError, ValueError) as e:
            usage(f"--tokenizer: {e}")
    else:
        vocab = cfg.vocab_size if cfg.vocab_size >= 320 else 384
        logging.info("training a %d-token BPE tokenizer on the corpus", vocab)
        tok = train_bpe(corpus_texts(records), vocab_size=vocab)
    if chief and os.path.abspath(path or "") != os.path.abspath(own):
        tok.save(own)
    return tok


def _has_tokenizer(d: str) -> bool:
    return any(os.path.isfile(os.path.join(d, n)) for n in ("tokenizer.json", "tokenizer.model"))


def main(argv):
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")
    common.init_distributed()
    import jax

    from ring_jax.data import DataError
    from ring_jax.data.pipeline import make_sft_dataset
    from ring_jax.train.checkpoint import CheckpointError, Checkpointer
    from ring_jax.train.loop import LoopConfig, NonFiniteError, batches_with_state, train_loop
    from ring_jax.train.losses import LossConfig, sft_loss_fn
    from ring_jax.train.metrics import MetricsWriter, flops_per_token, measure_matmul_peak
    from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
    from ring_jax.train.step import (abstract_train_state, create_train_state, data_parallel_size, global_batch,
                                     make_train_step, train_state_shardings)
    from ring_jax.data.synthetic import arithmetic_records, write_jsonl

    chief = jax.process_index() == 0
    cfg = common.model_config_from_flags()
    cfg, init_run, init_dir, init_step = common.resolve_init_ckpt(cfg)
    mesh = common.build_mesh(FLAGS.mesh)
    dp = data_parallel_size(mesh)
    _check_flags(dp, jax.process_count())
    try:
        optim_cfg = OptimConfig(lr=FLAGS.lr, schedule=FLAGS.schedule, warmup_ratio=FLAGS.warmup_ratio,
                                warmup_steps=FLAGS.warmup_steps, end_lr_ratio=FLAGS.end_lr_ratio, b1=FLAGS.b1,
                                b2=FLAGS.b2, eps=FLAGS.eps, weight_decay=FLAGS.weight_decay,
                                clip_norm=FLAGS.clip_norm)
    except ValueError as e:
        usage(str(e))

    out_dir = os.path.abspath(FLAGS.out_dir)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    resuming = common.resume_point(ckpt_dir, FLAGS.resume) is not None

    # ---- data
    if FLAGS.synthetic_corpus:
        records = arithmetic_records(FLAGS.synthetic_corpus, seed=FLAGS.data_seed)
        if chief:
            write_jsonl(records, os.path.join(out_dir, "data", "synthetic.jsonl"))
        source = records
    else:
        source, records = FLAGS.train_jsonl, None
        if FLAGS.tokenizer == "" and not FLAGS.hf_dir and not FLAGS.init_ckpt and not _has_tokenizer(
                os.path.join(out_dir, "tokenizer")):
            from ring_jax.data.jsonl import iter_records

            records = [r for _, _, r in iter_records(source)]  # corpus_texts keeps only the usable ones
    tok = _tokenizer(out_dir, records, cfg, chief, init_run or "")
    if tok.vocab_size > cfg.vocab_size:
        if FLAGS.hf_dir or FLAGS.init_ckpt:
            usage(f"tokenizer vocabulary {tok.vocab_size} > model vocab_size {cfg.vocab_size}")
        cfg = cfg.replace(vocab_size=-(-tok.vocab_size // 64) * 64)
        logging.info("vocab_size raised to %d to hold the tokenizer", cfg.vocab_size)
    try:
        ds, info = make_sft_dataset(source, tok, FLAGS.seq_len, FLAGS.global_batch, seed=FLAGS.data_seed,
                                    num_epochs=None if FLAGS.steps else (FLAGS.epochs or 1),
                                    max_bad_fraction=0.5 if FLAGS.synthetic_corpus else FLAGS.max_bad_fraction)
    except (DataError, ValueError, FileNotFoundError) as e:
        common.die(f"data: {e}")
    total_steps = FLAGS.steps or info.shard.num_batches
    if total_steps < 1:
        common.die("data: not a single batch")
    logging.info("data: %d rows of %d tokens, %d steps of %d rows", info.shard.num_items, FLAGS.seq_len,
                 total_steps, FLAGS.global_batch)

    # ---- model, optimizer, state
    graphdef, pvars, params = common.init_params(cfg, mesh, FLAGS.seed, FLAGS.hf_dir,
                                                 materialize=not (resuming or init_dir))
    optimizer, schedule = make_optimizer(optim_cfg, total_steps, decay_mask(pvars))
    abstract = abstract_train_state(params, optimizer, FLAGS.seed)
    shardings = train_state_shardings(pvars, abstract, mesh)
    it = iter(ds)
    with Checkpointer(ckpt_dir, save_every=FLAGS.ckpt_every, keep=FLAGS.keep) as ckpt:
        start_step = 0
        if resuming:
            try:
                restored = ckpt.restore(abstract, shardings)
            except CheckpointError as e:
                common.die(str(e))
            state, start_step = restored.state, restored.step
            if restored.data_state:
                it.set_state(restored.data_state)
            if chief:
                print(f"resumed from step {start_step} of {ckpt_dir}", flush=True)
        else:
            if init_dir:
                try:
                    with Checkpointer(init_dir, read_only=True) as c:
                        params = c.restore_params(params, shardings.params, init_step).params
                except CheckpointError as e:
                    common.die(f"--init_ckpt: {e}")
                logging.info("parameters initialised from %s", FLAGS.init_ckpt)
            state = create_train_state(params, optimizer, shardings, FLAGS.seed)
        if chief:
            common.write_json(os.path.join(out_dir, "config.json"), cfg.to_hf_dict())

        loss_fn = sft_loss_fn(LossConfig(alpha_bal=FLAGS.alpha_bal, alpha_z=FLAGS.alpha_z, ce_chunk=FLAGS.ce_chunk))
        step_fn = make_train_step(graphdef, loss_fn, optimizer, mesh, shardings, FLAGS.micro_batches,
                                  schedule=schedule)
        peak = FLAGS.peak_flops
        if peak < 0:
            peak = measure_matmul_peak(cfg.dtype) * jax.device_count()
            logging.info("measured matmul peak: %.1f GFLOP/s (all devices)", peak / 1e9)
        meta = {"model_config": cfg.to_hf_dict(),
                "runtime": {k: getattr(cfg, k) for k in ("dtype", "param_dtype", "moe_impl", "remat")},
                "seq_len": FLAGS.seq_len, "global_batch": FLAGS.global_batch, "micro_batches": FLAGS.micro_batches,
                "total_steps": total_steps}
        loop_cfg = LoopConfig(total_steps=total_steps, max_nonfinite=FLAGS.max_nonfinite,
                              log_every=FLAGS.log_every, step_delay_s=FLAGS.step_delay_s)
        with MetricsWriter(out_dir, total_steps, peak_flops=peak or None,
                           flops_per_token=flops_per_token(cfg, FLAGS.seq_len), is_chief=chief, desc="sft",
                           show_bar=FLAGS.progress_bar) as writer:
            try:
                result = train_loop(step_fn, state, batches_with_state(it), start_step=start_step, cfg=loop_cfg,
                                    to_device=lambda b: global_batch(b, mesh), checkpointer=ckpt, writer=writer,
                                    meta=meta, tokens_per_step=FLAGS.global_batch * FLAGS.seq_len)
            except NonFiniteError as e:
                common.die(str(e))
    if result.preempted:
        print(f"pre-empted by signal {result.signal}: checkpoint of step {result.step} in {ckpt_dir}", flush=True)
        sys.exit(128 + int(result.signal))
    if chief:
        print(f"done: step {result.step}, loss {result.last_metrics.get('loss', float('nan')):.4f}; "
              f"checkpoints in {ckpt_dir}", flush=True)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
