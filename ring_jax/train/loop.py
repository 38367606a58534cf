"""The training loop: batches -> compiled step -> metrics -> checkpoints, with pre-emption and non-finite handling.

Resume semantics: a checkpoint written after step ``s`` holds the state after ``s`` updates and the data iterator
state after the ``s``-th batch; a run resumed from it executes steps ``s+1 ..`` on exactly the batches (and, on the
same devices and mesh, with exactly the float operations) the uninterrupted run would have, so its per-step losses
are bit-identical.  Steps logged after the last checkpoint by a killed run are logged again by the resumed run
(``metrics.jsonl`` is appended to; the last record of a step wins).

SIGTERM/SIGINT (pre-emption, Ctrl-C): the current step finishes, a checkpoint of it is written synchronously, and
:func:`train_loop` returns with ``preempted=True`` (the CLI then exits with status 128 + signal).  A second signal
falls back to the default action.  Multi-host: hosts must agree on the step to save at, so no Python handler is
installed; JAX's preemption sync point (``multihost_utils.reached_preemption_sync_point``, fed by the coordination
service's SIGTERM notifier once ``jax.distributed.initialize()`` ran) decides.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import jax
import numpy as np
from absl import logging

if TYPE_CHECKING:
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.metrics import MetricsWriter
    from ring_jax.train.step import TrainState

_B = TypeVar("_B")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""


class StepAborted(RuntimeError):
    """Raised by a step function that gives up BEFORE changing the state it was given (e.g. the RL step when too
    many rewards failed).  :func:`train_loop` then checkpoints the last completed step, if it has not yet, and
    re-raises, so the run can be resumed from where it stopped; ``.last_checkpoint`` names that step."""

    last_checkpoint: int | None = None


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    total_steps: int  # the step number to stop at (steps are 1-based: the last step run is total_steps)
    max_nonfinite: int = 10  # stop after this many consecutive skipped (non-finite) steps; 0 = never
    log_every: int = 1
    step_delay_s: float = 0.0  # testing aid: sleep after each step (makes kill timing deterministic)


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int  # last step completed
    preempted: bool
    signal: int | None
    last_metrics: dict


class SignalGuard:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint first.  A no-op off the main thread."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.received is not None:  # second signal: default behaviour
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum
        logging.warning(
            "received %s: finishing the current step, then checkpointing and exiting", signal.Signals(signum).name
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def _scalars(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a if a.ndim else a.item()
    return out


def train_loop(
    step_fn: Callable,
    state: TrainState,
    batches: Iterator,
    *,
    start_step: int,
    cfg: LoopConfig,
    to_device: Callable = lambda b: b,
    checkpointer: Checkpointer | None = None,
    writer: MetricsWriter | None = None,
    meta: Callable[[int], dict] | dict | None = None,
    tokens_per_step: int | None = None,
    on_metrics: Callable[[int, dict], None] | None = None,
) -> LoopResult:
    """Run steps ``start_step + 1 .. cfg.total_steps``.

    Args:
      step_fn: ``step_fn(state, batch) -> (state, metrics)`` (``make_train_step``).
      batches: yields ``(host_batch, data_state)``: ``data_state`` is the iterator state right after this batch
        was drawn (what a checkpoint of this step must hold), or None.
      to_device: host batch -> global device batch (``ring_jax.train.step.global_batch``).
      checkpointer: a ``Checkpointer`` (saves when ``should_save(step)``, and at the end / on a signal).
      writer: a ``MetricsWriter`` (``write(step, scalars)``); None: log through absl only.
      meta: extra JSON for each checkpoint (or a function of the step returning it).
      tokens_per_step: token positions per step, logged as ``tokens`` (the writer turns it into tokens/s, MFU).
    Raises NonFiniteError after ``cfg.max_nonfinite`` consecutive skipped steps (no checkpoint of them is written).
    """

    def meta_for(step):
        return meta(step) if callable(meta) else dict(meta or {})

    step = start_step
    consecutive = 0
    last: dict = {}
    saved_at = None

    def fetch():
        try:
            host, dstate = next(batches)
        except StopIteration:
            return None
        return to_device(host), dstate

    multi = jax.process_count() > 1
    prev_dstate = None  # the data state after the last completed step's batch
    with SignalGuard(signals=() if multi else (signal.SIGTERM, signal.SIGINT)) as guard:
        nxt = fetch() if step < cfg.total_steps else None
        while step < cfg.total_steps and nxt is not None:
            batch, dstate = nxt
            t0 = time.perf_counter()
            try:
                state, metrics = step_fn(state, batch)
            except StepAborted as e:
                if checkpointer is not None and step > start_step and saved_at != step:
                    checkpointer.save(step, state, prev_dstate, meta_for(step), wait=True)
                    saved_at = step
                e.last_checkpoint = saved_at if saved_at is not None else (start_step or None)
                raise
            prev_dstate = dstate
            step += 1
            nxt = fetch() if step < cfg.total_steps else None  # overlaps the device computation
            last = _scalars(jax.device_get(metrics))
            last["step_time_s"] = time.perf_counter() - t0
            if tokens_per_step:
                last["tokens"] = tokens_per_step
            if last.get("skipped"):
                consecutive += 1
                logging.warning(
                    "step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row)",
                    step,
                    last.get("loss"),
                    last.get("grad_norm"),
                    consecutive,
                )
            else:
                consecutive = 0
            if writer is not None and (step % cfg.log_every == 0 or step == cfg.total_steps):
                writer.write(step, last)
                if step == start_step + 1 and hasattr(writer, "reset_clock"):
                    writer.reset_clock()  # keep compilation out of tokens/s
            elif writer is None and step % cfg.log_every == 0:
                logging.info(
                    "step %d: loss %.5f grad_norm %.4f",
                    step,
                    last.get("loss", float("nan")),
                    last.get("grad_norm", float("nan")),
                )
            if on_metrics is not None:
                on_metrics(step, last)
            if cfg.max_nonfinite and consecutive >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"stopping at step {step}: {consecutive} consecutive steps had a non-finite loss or gradient "
                    f"norm (updates skipped; raise --max_nonfinite or lower the learning rate)"
                    + (f"; last checkpoint: step {saved_at}" if saved_at is not None else "")
                )
            if multi and guard.received is None and _preemption_sync_point(step):
                guard.received = signal.SIGTERM
            if checkpointer is not None and checkpointer.should_save(step) and guard.received is None:
                checkpointer.save(step, state, dstate, meta_for(step))
                saved_at = step
            if guard.received is not None:
                if checkpointer is not None:
                    if saved_at != step:
                        checkpointer.save(step, state, dstate, meta_for(step), wait=True)
                    checkpointer.wait()
                    logging.warning("pre-empted: checkpoint of step %d written to %s", step, checkpointer.directory)
                return LoopResult(state, step, True, guard.received, last)
            if cfg.step_delay_s:
                time.sleep(cfg.step_delay_s)
        if nxt is None and step < cfg.total_steps:
            logging.warning("data exhausted after step %d (of %d)", step, cfg.total_steps)
        if checkpointer is not None and step > start_step:
            if saved_at != step:
                checkpointer.save(step, state, dstate, meta_for(step))
            checkpointer.wait()
    return LoopResult(state, step, False, None, last)


def _preemption_sync_point(step: int) -> bool:
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except Exception:  # noqa: BLE001  (no preemption service: jax.distributed not initialised)
        return False


def batches_with_state(it: Iterable[_B]) -> Iterator[tuple[_B, dict | None]]:
    """(batch, iterator state after it) pairs from a grain iterator."""
    from ring_jax.train.checkpoint import data_state_json

    for batch in it:
        yield batch, data_state_json(it)


__all__ = [
    "LoopConfig",
    "LoopResult",
    "NonFiniteError",
    "SignalGuard",
    "StepAborted",
    "batches_with_state",
    "train_loop",
]
