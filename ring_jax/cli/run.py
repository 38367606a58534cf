"""The skeleton the training CLIs (ring-jax-sft, ring-jax-rl) share, so that each ``main`` reads as its recipe:

    common.start_main(argv)
    run = TrainRun.from_flags()           # model config (--hf_dir / --preset / --init_ckpt), mesh, run directory
    run.check_resume()                    # --resume against <out_dir>/ckpt
    run.use_tokenizer(run.find_tokenizer() or <a tokenizer trained here>)   # grows a preset's vocab, saves it
    run.build(optim_cfg, total_updates)   # parameters (or their shapes), optimizer, train-state shardings
    with run.checkpointer() as ckpt:
        state, start_step = run.restore_or_init(ckpt, data_iter)   # --resume, --init_ckpt, --hf_dir or the preset
        result = run.train(step_fn, state, data_iter, start_step=start_step, ckpt=ckpt, loop_cfg=..., desc=...)
    run.exit_if_preempted(result)         # exit status 128 + signal after the checkpoint

The flags it reads are those of ``common.define_model_flags`` / ``define_runtime_flags`` and the run flags both
CLIs define: --tokenizer, --out_dir, --resume, --ckpt_every, --keep, --progress_bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from absl import flags, logging

from ring_jax.cli import common

if TYPE_CHECKING:
    import grain
    from jax.sharding import Mesh

    from ring_jax.config import ModelConfig
    from ring_jax.data.tokenizer import Tokenizer
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.loop import LoopConfig, LoopResult
    from ring_jax.train.optim import OptimConfig
    from ring_jax.train.step import TrainState

FLAGS = flags.FLAGS
RUNTIME_KEYS = ("dtype", "param_dtype", "moe_impl", "remat")  # the model-config fields a checkpoint's meta records


class TrainRun:
    """One training run: its model config, mesh, run directory and where its parameters start from.

    Attributes: ``cfg`` (the ModelConfig; `use_tokenizer` may grow its vocabulary), ``mesh``, ``chief`` (process
    0), ``out_dir`` (absolute), ``ckpt_dir`` (``<out_dir>/ckpt``), ``init_run`` / ``init_dir`` / ``init_step``
    (the --init_ckpt run directory, checkpoint directory and step, or None), ``resuming`` (set by `check_resume`);
    after `build`: ``graphdef``, ``param_vars``, ``params`` (their shapes only when the run resumes or starts from
    --init_ckpt), ``optimizer``, ``schedule``, ``abstract_state`` and ``shardings`` (of the train state)."""

    def __init__(
        self,
        cfg: ModelConfig,
        mesh: Mesh,
        out_dir: str,
        init_run: str | None = None,
        init_dir: str | None = None,
        init_step: int | None = None,
        chief: bool = True,
    ):
        self.cfg = cfg
        self.mesh = mesh
        self.chief = chief
        self.out_dir = os.path.abspath(out_dir)
        self.ckpt_dir = os.path.join(self.out_dir, "ckpt")
        self.init_run, self.init_dir, self.init_step = init_run, init_dir, init_step
        self.resuming = False
        self.tokenizer_path = ""  # where find_tokenizer loaded the tokenizer from ("" when it found none)
        self.graphdef = self.param_vars = self.params = None
        self.optimizer = self.schedule = self.abstract_state = self.shardings = None

    @classmethod
    def from_flags(cls) -> TrainRun:
        """The run the flags describe: model config from --hf_dir or --preset (or the --init_ckpt checkpoint's own,
        unless --hf_dir), the --mesh, and --out_dir.  Bad values are one-line usage errors."""
        import jax

        cfg = common.model_config_from_flags()
        cfg, init_run, init_dir, init_step = common.resolve_init_ckpt(cfg)
        mesh = common.build_mesh(FLAGS.mesh)
        return cls(cfg, mesh, FLAGS.out_dir, init_run, init_dir, init_step, chief=jax.process_index() == 0)

    def check_resume(self) -> bool:
        """``common.resume_point`` on ``<out_dir>/ckpt`` with --resume (a usage error over an existing run without
        it); sets and returns ``resuming``."""
        self.resuming = common.resume_point(self.ckpt_dir, FLAGS.resume) is not None
        return self.resuming

    # ------------------------------------------------------------------------------------------ tokenizer
    def find_tokenizer(self) -> Tokenizer | None:
        """The tokenizer found by ``common.find_tokenizer`` (its search order), or None."""
        found = common.find_tokenizer(self.out_dir, self.init_run)
        if found is None:
            self.tokenizer_path = ""
            return None
        tok, self.tokenizer_path = found
        return tok

    def use_tokenizer(self, tok: Tokenizer) -> None:
        """Make ``tok`` the run's tokenizer: a vocabulary larger than the model's grows ``cfg.vocab_size`` to the
        next multiple of 64 (a preset run; with --hf_dir or --init_ckpt the parameters are given, so that is a usage
        error), and the chief saves it to ``<out_dir>/tokenizer`` unless it was loaded from there."""
        if tok.vocab_size > self.cfg.vocab_size:
            if FLAGS.hf_dir or FLAGS.init_ckpt:
                common.usage(f"tokenizer vocabulary {tok.vocab_size} > model vocab_size {self.cfg.vocab_size}")
            self.cfg = self.cfg.replace(vocab_size=-(-tok.vocab_size // 64) * 64)
            logging.info("vocab_size raised to %d to hold the tokenizer", self.cfg.vocab_size)
        own = os.path.join(self.out_dir, "tokenizer")
        if self.chief and os.path.abspath(self.tokenizer_path or "") != own:
            tok.save(own)

    # ------------------------------------------------------------------------------------------ model and state
    def build(self, optim_cfg: OptimConfig, total_updates: int) -> None:
        """The model's graph and parameters (materialised only for a fresh start from --hf_dir or the preset), the
        optimizer and learning-rate schedule over ``total_updates`` updates, and the train state's shapes and
        shardings."""
        from ring_jax.train.optim import decay_mask, make_optimizer
        from ring_jax.train.step import abstract_train_state, train_state_shardings

        self.graphdef, self.param_vars, self.params = common.init_params(
            self.cfg, self.mesh, FLAGS.seed, FLAGS.hf_dir, materialize=not (self.resuming or self.init_dir)
        )
        self.optimizer, self.schedule = make_optimizer(optim_cfg, total_updates, decay_mask(self.param_vars))
        self.abstract_state = abstract_train_state(self.params, self.optimizer, FLAGS.seed)
        self.shardings = train_state_shardings(self.param_vars, self.abstract_state, self.mesh)

    def checkpointer(self) -> Checkpointer:
        """The run's checkpointer on ``<out_dir>/ckpt`` (--ckpt_every, --keep); use it as a context manager."""
        from ring_jax.train.checkpoint import Checkpointer

        return Checkpointer(self.ckpt_dir, save_every=FLAGS.ckpt_every, keep=FLAGS.keep)

    def restore_or_init(
        self, ckpt: Checkpointer, data_iter: grain.DatasetIterator, record_init: bool = False
    ) -> tuple[TrainState, int]:
        """(train state, step it is at).  Resuming: the newest readable checkpoint of ``ckpt`` (an unreadable run is
        one error line, exit 1), with ``data_iter``'s position restored.  Otherwise a fresh state on the parameters
        from --init_ckpt (restored here), --hf_dir or the preset; with ``record_init`` their source and checksums go
        to ``<out_dir>/init.json`` (``common.write_init_record``).  The chief writes ``<out_dir>/config.json``."""
        from ring_jax.train.checkpoint import CheckpointError
        from ring_jax.train.step import create_train_state

        if self.resuming:
            try:
                restored = ckpt.restore(self.abstract_state, self.shardings)
            except CheckpointError as e:
                common.die(str(e), now=True)
            state, start_step = restored.state, restored.step
            if restored.data_state:
                data_iter.set_state(restored.data_state)
            if self.chief:
                print(f"resumed from step {start_step} of {self.ckpt_dir}", flush=True)
        else:
            state, start_step = (
                create_train_state(self._initial_params(record_init), self.optimizer, self.shardings, FLAGS.seed),
                0,
            )
        if self.chief:
            common.write_json(os.path.join(self.out_dir, "config.json"), self.cfg.to_hf_dict())
        return state, start_step

    def _initial_params(self, record_init: bool):
        from ring_jax.train.checkpoint import Checkpointer, CheckpointError

        if not self.init_dir:
            if record_init:
                source = (
                    {"hf_dir": os.path.abspath(FLAGS.hf_dir)}
                    if FLAGS.hf_dir
                    else {"preset": FLAGS.preset, "seed": FLAGS.seed}
                )
                common.write_init_record(self.out_dir, None, None, self.params, self.chief, **source)
            return self.params
        try:
            with Checkpointer(self.init_dir, read_only=True) as c:
                restored = c.restore_params(self.params, self.shardings.params, self.init_step)
        except CheckpointError as e:
            common.die(f"--init_ckpt: {e}", now=True)
        logging.info("parameters initialised from %s", FLAGS.init_ckpt)
        if record_init:
            common.write_init_record(self.out_dir, self.init_dir, restored.step, restored.params, self.chief)
        return restored.params

    # ------------------------------------------------------------------------------------------ training
    def train(
        self,
        step_fn: Callable,
        state: TrainState,
        data_iter: Iterator,
        *,
        start_step: int,
        ckpt: Checkpointer,
        loop_cfg: LoopConfig,
        desc: str,
        meta: dict | None = None,
        writer_kw: dict | None = None,
        **loop_kw: Any,
    ) -> LoopResult:
        """``train_loop`` from ``start_step`` to ``loop_cfg.total_steps`` over ``data_iter`` (its position saved with
        every checkpoint), metrics to ``<out_dir>`` (``MetricsWriter(..., desc=desc, **writer_kw)``, the bar by
        --progress_bar).  Each checkpoint's meta: the model config, its run-time settings, ``meta`` and the total
        steps.  ``loop_kw`` go to ``train_loop`` (``to_device``, ``tokens_per_step``).  Too many non-finite steps,
        or a step that gives up (``StepAborted``, after the last checkpoint), are one error line, exit 1."""
        from ring_jax.train.loop import NonFiniteError, StepAborted, batches_with_state, train_loop
        from ring_jax.train.metrics import MetricsWriter

        meta = {
            "model_config": self.cfg.to_hf_dict(),
            "runtime": {k: getattr(self.cfg, k) for k in RUNTIME_KEYS},
            **(meta or {}),
            "total_steps": loop_cfg.total_steps,
        }
        with MetricsWriter(
            self.out_dir,
            loop_cfg.total_steps,
            is_chief=self.chief,
            desc=desc,
            show_bar=FLAGS.progress_bar,
            **(writer_kw or {}),
        ) as writer:
            try:
                return train_loop(
                    step_fn,
                    state,
                    batches_with_state(data_iter),
                    start_step=start_step,
                    cfg=loop_cfg,
                    checkpointer=ckpt,
                    writer=writer,
                    meta=meta,
                    **loop_kw,
                )
            except NonFiniteError as e:
                common.die(str(e))
            except StepAborted as e:
                common.die(
                    f"{e}; last checkpoint: "
                    + (
                        f"step {e.last_checkpoint} in {self.ckpt_dir} (continue with --resume)"
                        if e.last_checkpoint
                        else "none"
                    )
                )

    def exit_if_preempted(self, result: LoopResult) -> None:
        """After a loop stopped by SIGTERM / SIGINT (its checkpoint written): say so and exit with status 128 +
        the signal.  Call it after the checkpointer is closed."""
        if result.preempted:
            print(
                f"pre-empted by signal {result.signal}: checkpoint of step {result.step} in {self.ckpt_dir}", flush=True
            )
            sys.exit(128 + int(result.signal))


__all__ = ["RUNTIME_KEYS", "TrainRun"]
