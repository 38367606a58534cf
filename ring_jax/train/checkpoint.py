"""Checkpoints: an orbax ``CheckpointManager`` holding everything a run needs to continue exactly.

One checkpoint = one step directory ``<dir>/<step>/`` with five items:

- ``params``: the pure parameter tree (float32 master weights), sharded arrays written by every process;
- ``opt_state``: the optax state;
- ``train``: ``{"step", "skipped", "rng"}`` (steps taken, non-finite skips, raw PRNG key data);
- ``data``: the data iterator state (JSON, ``grain`` ``it.get_state()``), so the next batch after a resume is the
  batch the uninterrupted run would have seen;
- ``meta``: JSON: the model config (``config.json`` fields + run-time knobs) and whatever the caller adds.

Saves are asynchronous (the device->host copy happens before ``save`` returns, the writes in the background);
orbax writes into a temporary directory and renames it when complete, so a killed save never looks like a
checkpoint.  Restoring walks the steps newest first: a step that fails to restore (truncated or missing files,
undecodable data, a checksum mismatch, step mismatch) is reported and the previous step is tried; once an older step
has restored, the unreadable newer ones are moved to ``<dir>.corrupt/`` (so the resumed run can write those steps
again).  When no step is readable nothing is moved: the directory still shows that the run had checkpoints.
Layout: ``meta['param_layout'] == 'stacked-layers'`` (every checkpoint written since the decoder layers were
stacked: ``first_layers`` + ``layers`` with a leading layer axis).  A checkpoint without it holds one subtree per
decoder layer (``layers/0 .. layers/L-1``); it is restored into that layout and converted (params and the Adam
moments alike), so old SFT checkpoints still start RL and resume.
Export to Hugging Face format: ``restore_params`` -> ``nnx.merge`` -> ``ring_jax.hf.save_pretrained`` (see
``ring_jax.cli.export``).
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import shutil
import sys
import time
import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ring_jax.train.step import TrainState

if TYPE_CHECKING:
    from ring_jax.config import ModelConfig

ITEMS = ("params", "opt_state", "train", "data", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint."""


PARAM_LAYOUT = "stacked-layers"


def _is_model_node(x) -> bool:
    """The parameter subtree of a whole model (params, or an Adam moment over them)."""
    return isinstance(x, dict) and "word_embeddings" in x and "layers" in x


def _slice_abstract(a):
    sh = getattr(a, "sharding", None)
    if isinstance(sh, jax.sharding.NamedSharding):
        sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
    return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sh)


def unrolled_abstract(tree: Any) -> Any:
    """``tree`` (abstract, stacked layout) as it was written before the layers were stacked: every model node's
    ``first_layers`` i and stack slice j become ``layers`` i and ``layers`` k + j."""

    def one(node):
        if not _is_model_node(node):
            return node
        first = node.get("first_layers") or {}
        k = len(first)
        n = jax.tree.leaves(node["layers"])[0].shape[0]
        out = {key: v for key, v in node.items() if key not in ("first_layers", "layers")}
        out["layers"] = {
            **{i: first[i] for i in range(k)},
            **{k + j: jax.tree.map(_slice_abstract, node["layers"]) for j in range(n)},
        }
        return out

    return jax.tree.map(one, tree, is_leaf=_is_model_node)


def restack(restored: Any, target: Any) -> Any:
    """Inverse of :func:`unrolled_abstract` on restored arrays, placed like ``target`` (abstract, stacked)."""

    def one(node, want):
        if not _is_model_node(want):
            return node
        first = want.get("first_layers") or {}
        k = len(first)
        n = jax.tree.leaves(want["layers"])[0].shape[0]
        out = {key: v for key, v in node.items() if key != "layers"}
        if "first_layers" in want:
            out["first_layers"] = {i: node["layers"][i] for i in range(k)}
        out["layers"] = jax.tree.map(
            lambda w, *xs: jax.device_put(jnp.stack(xs), w.sharding),
            want["layers"],
            *[node["layers"][k + j] for j in range(n)],
        )
        return out

    return jax.tree.map(one, restored, target, is_leaf=lambda x: _is_model_node(x) or x is None)


@dataclasses.dataclass
class Restored:
    step: int
    state: TrainState | None  # None when only the parameters were restored
    params: Any
    data_state: dict | None
    meta: dict


def _abstract(tree, shardings=None):
    """ShapeDtypeStructs (with shardings when given) for a tree of arrays or ShapeDtypeStructs."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
        )
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@jax.jit
def tree_checksums(tree: Any) -> jax.Array:
    """One uint32 per leaf: a position-weighted wrapping sum of the leaf's raw bits (any flipped, zeroed or swapped
    word changes it).  Computed on device, sharded like the leaves; stored in ``meta`` and checked on restore, so
    a damaged file that still decodes (and would otherwise restore silently wrong values) is detected."""
    out = []
    for x in jax.tree.leaves(tree):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            w = x.astype(jnp.uint32)
        elif x.dtype.itemsize == 4:
            w = jax.lax.bitcast_convert_type(x, jnp.uint32)
        elif x.dtype.itemsize == 2:
            w = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        elif x.dtype.itemsize == 1:
            w = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
        else:
            w = jax.lax.bitcast_convert_type(x, jnp.uint32)  # 8-byte types -> [..., 2]
        w = w.reshape(-1)
        weight = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
        out.append(jnp.sum(w * weight, dtype=jnp.uint32) ^ (jnp.sum(w, dtype=jnp.uint32) * jnp.uint32(40503)))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.uint32)


def _quiet_abandoned_reads() -> None:
    """Silence (once per process) the teardown noise of a failed restore, and nothing else.

    When one array of a restore fails, orbax's ``run_sync`` raises and closes its private asyncio loop while the
    tensorstore reads of the other arrays are still in flight.  As each finishes, (1) tensorstore's completion
    callback calls ``loop.call_soon_threadsafe`` on the closed loop and the ``RuntimeError('Event loop is closed')``
    is printed as an unraisable exception from a tensorstore thread, and (2) the abandoned futures, garbage
    collected with their tensorstore errors unread, are logged by asyncio as "Future/Task exception was never
    retrieved", and (3) a suspended read coroutine closed by the garbage collector re-raises its read error
    ("Encountered error while reading array index"), printed as "Exception ignored in: <coroutine ...>".  That is
    a traceback per array (hundreds of lines on stderr), harmless (the failure itself is reported), and arriving at
    any time up to process exit.  Other unraisable exceptions go to the hook installed before; other asyncio
    records are kept."""
    previous = sys.unraisablehook
    if not getattr(previous, "ring_jax_quiet", False):

        def hook(unraisable):
            exc = unraisable.exc_value
            closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
            abandoned_read = str(exc).startswith("Encountered error while reading array index")
            if not (closed_loop or abandoned_read):
                previous(unraisable)

        hook.ring_jax_quiet = True
        sys.unraisablehook = hook
    pylogging.getLogger("asyncio").addFilter(_keep_asyncio_record)  # a no-op when already added
    # (4) an abandoned read coroutine that never started is reported at interpreter exit as "coroutine
    # '_read_array_index_and_device_put' was never awaited" (seen in a CI run, 2026-12-06): orbax's, only that one
    warnings.filterwarnings(
        "ignore", message="coroutine '_read_array_index_and_device_put' was never awaited", category=RuntimeWarning
    )


def _keep_asyncio_record(record) -> bool:
    """False for asyncio's report of an abandoned future holding a tensorstore read error."""
    exc = record.exc_info[1] if record.exc_info else None
    # orbax's wrapper reads "Encountered error while reading array index: ... See full TensorStore details": match
    # case-insensitively (a lowercase-only match let some of these through, depending on which read failed last);
    # a read that fails inside the OCDBT store itself surfaces as tensorstore's bare ValueError ("OUT_OF_RANGE: Error
    # reading ... in OCDBT database ..."), seen once in a CI run
    text = str(exc).lower() if exc is not None else ""
    return not (
        (
            "tensorstore" in text
            or "ocdbt database" in text
            or text.startswith("encountered error while reading array index")
        )
        and str(record.msg).startswith(("Future exception was never retrieved", "Task exception was never retrieved"))
    )


def _checksums(tree) -> list[int]:
    return [int(v) for v in np.asarray(jax.device_get(tree_checksums(tree)))]


class Checkpointer:
    """Save every ``save_every`` steps (and whenever forced), keep the newest ``keep``.

    ``save(step, state, data_state, meta)`` / ``maybe_save(...)`` / ``restore(abstract_state, shardings)`` /
    ``restore_params(abstract_params)`` / ``wait()`` / ``close()``.  All processes must call save/restore
    (arrays are written and read shard by shard); only process 0 moves corrupt steps aside.
    """

    def __init__(
        self,
        directory: str,
        *,
        save_every: int = 0,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        self.save_every = save_every
        self.read_only = read_only
        if not read_only:
            os.makedirs(self.directory, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ------------------------------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def should_save(self, step: int) -> bool:
        return self.save_every > 0 and step % self.save_every == 0

    # ------------------------------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        state: TrainState | None = None,
        data_state: dict | None = None,
        meta: dict | None = None,
        *,
        params: dict[str, Any] | None = None,
        wait: bool = False,
    ) -> None:
        """Write checkpoint ``step`` (asynchronously unless ``wait``).  ``params`` alone (no ``state``) writes a
        parameters-only checkpoint (``ring-jax-import``); restoring it with :meth:`restore` is an error, with
        :meth:`restore_params` fine."""
        if step in self._mngr.all_steps():
            logging.info("checkpoint step %d already exists; not saving it again", step)
            return
        if state is not None:
            params = state.params
            items = dict(
                opt_state=ocp.args.StandardSave(state.opt_state),
                train=ocp.args.StandardSave({"step": state.step, "skipped": state.skipped, "rng": state.rng}),
            )
        else:
            items = {}
        items["params"] = ocp.args.StandardSave(params)
        items["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
        sums = {"params": _checksums(params)}
        if state is not None:
            sums["opt_state"] = _checksums(state.opt_state)
        # the state's own update count: == step, unless one loop step makes several updates (RL's
        # --updates_per_rollout); checked on restore
        extra = {"state_step": int(state.step)} if state is not None else {}
        items["meta"] = ocp.args.JsonSave(
            dict(
                meta or {},
                step=int(step),
                has_state=state is not None,
                checksums=sums,
                param_layout=PARAM_LAYOUT,
                **extra,
            )
        )
        t0 = time.time()
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self._mngr.wait_until_finished()
        logging.info(
            "checkpoint step %d %s in %.2fs -> %s",
            step,
            "written" if wait else "started",
            time.time() - t0,
            self.directory,
        )

    def maybe_save(
        self, step: int, state: TrainState, data_state: dict | None = None, meta: dict | None = None
    ) -> bool:
        if self.should_save(step):
            self.save(step, state, data_state, meta)
            return True
        return False

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ restore
    def _quarantine(self, step: int) -> None:
        if self.read_only:
            return
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst_dir = corrupt_dir(self.directory)
            os.makedirs(dst_dir, exist_ok=True)
            dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
            if os.path.exists(src):
                shutil.move(src, dst)
                logging.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ring_jax_quarantine_{step}")
        self._mngr.reload()

    def _candidates(self, step: int | None) -> list[int]:
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {steps})")
            return [step]
        return steps[::-1]

    def _restore_one(self, step: int, abstract_state: TrainState | None, abstract_params) -> Restored:
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if int(meta.get("step", -1)) != step:
            raise CheckpointError(f"meta.step={meta.get('step')} does not match the directory name {step}")
        old = meta.get("param_layout") != PARAM_LAYOUT  # one subtree per layer: restore so, then stack
        as_written = unrolled_abstract if old else (lambda t: t)
        if abstract_state is not None:
            if not meta.get("has_state", False):
                raise CheckpointError(
                    "parameters-only checkpoint (written by ring-jax-import); it has no optimizer "
                    "state to resume from: use it as --init_ckpt"
                )
            train_abs = {"step": abstract_state.step, "skipped": abstract_state.skipped, "rng": abstract_state.rng}
            r = self._mngr.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(as_written(abstract_state.params)),
                    opt_state=ocp.args.StandardRestore(as_written(abstract_state.opt_state)),
                    train=ocp.args.StandardRestore(train_abs),
                    data=ocp.args.JsonRestore(),
                ),
            )
            self._verify(meta, "params", r.params)
            self._verify(meta, "opt_state", r.opt_state)
            params, opt_state = r.params, r.opt_state
            if old:
                params = restack(params, abstract_state.params)
                opt_state = restack(opt_state, abstract_state.opt_state)
            state = TrainState(
                params=params, opt_state=opt_state, step=r.train["step"], skipped=r.train["skipped"], rng=r.train["rng"]
            )
            want = int(meta.get("state_step", step))
            if int(state.step) != want:
                raise CheckpointError(
                    f"train.step={int(state.step)} does not match the recorded {want} (checkpoint {step})"
                )
            return Restored(step, state, state.params, r.data or None, meta)
        r = self._mngr.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(as_written(abstract_params)))
        )
        self._verify(meta, "params", r.params)
        params = restack(r.params, abstract_params) if old else r.params
        return Restored(step, None, params, None, meta)

    @staticmethod
    def _verify(meta: dict, name: str, tree) -> None:
        want = (meta.get("checksums") or {}).get(name)
        if want is None:
            return
        got = _checksums(tree)
        if got != want:
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
            bad = [
                paths[i] if i < len(paths) else str(i)
                for i in range(max(len(got), len(want)))
                if i >= len(got) or i >= len(want) or got[i] != want[i]
            ]
            raise CheckpointError(f"{name}: checksum mismatch in {len(bad)} arrays, e.g. {bad[:3]}")

    def _restore(self, step, abstract_state, abstract_params) -> Restored:
        """``step``, or the newest readable step; unreadable newer steps are quarantined only once an older one
        has restored, so a directory where nothing restores is left as it was (and keeps refusing a fresh start)."""
        _quiet_abandoned_reads()
        unreadable = []  # (step, message), newest first
        for s in self._candidates(step):
            try:
                restored = self._restore_one(s, abstract_state, abstract_params)
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                if step is not None:
                    raise CheckpointError(f"checkpoint step {s} in {self.directory} is unreadable ({msg})") from e
                if isinstance(e, CheckpointError) and "parameters-only" in msg:
                    raise
                logging.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying the previous one", s, self.directory, msg
                )
                unreadable.append((s, msg))
                continue
            for bad, msg in unreadable:
                if jax.process_index() == 0:
                    print(
                        f"warning: checkpoint step {bad} in {self.directory} is unreadable ({msg}); "
                        f"restored step {s} instead",
                        flush=True,
                    )
                self._quarantine(bad)
            return restored
        if not unreadable:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (it is empty)")
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: all {len(unreadable)} steps fail to "
            "restore (nothing was moved); " + "; ".join(f"step {s}: {m}" for s, m in unreadable)
        )

    def restore(
        self, abstract_state: TrainState, shardings: TrainState | None = None, step: int | None = None
    ) -> Restored:
        """The newest readable checkpoint (or exactly ``step``) as a TrainState placed like ``abstract_state``
        (ShapeDtypeStructs, e.g. ``abstract_train_state``; pass ``shardings`` to set where each leaf goes), plus
        the data iterator state and meta.  Unreadable newer steps are reported and, once an older step has restored,
        moved aside."""
        abstract_state = TrainState(
            *[
                _abstract(a, s)
                for a, s in zip(
                    abstract_state, shardings if shardings is not None else [None] * len(TrainState._fields)
                )
            ]
        )
        return self._restore(step, abstract_state, None)

    def restore_params(
        self, abstract_params: dict[str, Any], shardings: dict[str, Any] | None = None, step: int | None = None
    ) -> Restored:
        """Only the parameters (any checkpoint, including parameters-only ones)."""
        return self._restore(step, None, _abstract(abstract_params, shardings))

    def read_meta(self, step: int | None = None) -> dict:
        """The meta JSON of ``step``, or of the newest step whose meta is readable."""
        errors = []
        for s in self._candidates(step):
            try:
                return self._mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            except Exception as e:  # noqa: BLE001
                errors.append(f"step {s}: {type(e).__name__}: {e}"[:200])
        raise CheckpointError(
            f"no readable checkpoint metadata in {self.directory}"
            + (f": {'; '.join(errors)}" if errors else " (it is empty)")
        )


def corrupt_dir(directory: str) -> str:
    """Where unreadable steps of checkpoint directory ``directory`` are moved: ``<directory>.corrupt``."""
    return os.path.abspath(directory) + ".corrupt"


def latest_step_in(directory: str) -> int | None:
    """Newest step in a checkpoint directory (None if it does not exist or is empty), without writing anything."""
    if not os.path.isdir(directory):
        return None
    with Checkpointer(directory, read_only=True) as c:
        return c.latest_step()


def model_config_from_meta(meta: dict, **overrides: Any) -> ModelConfig:
    """The ModelConfig a checkpoint was written with (``meta["model_config"]`` + ``meta["runtime"]``), with
    run-time overrides (dtype, param_dtype, moe_impl, remat)."""
    from ring_jax.config import ModelConfig

    if "model_config" not in meta:
        raise CheckpointError("checkpoint meta has no model_config")
    runtime = dict(meta.get("runtime") or {}, **overrides)
    return ModelConfig.from_hf_dict(meta["model_config"], **runtime)


def resolve_ckpt_dir(path: str) -> tuple[str, str]:
    """(run directory, checkpoint directory) for a run directory (holding ``ckpt/``) or a checkpoint directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "ckpt")):
        return path, os.path.join(path, "ckpt")
    return os.path.dirname(path), path


def data_state_json(it: object) -> dict | None:
    """A grain iterator's state as plain JSON types (None if the iterator has no state)."""
    if it is None or not hasattr(it, "get_state"):
        return None
    st = it.get_state()
    return jax.tree.map(lambda x: x.item() if isinstance(x, np.generic) else x, st)


__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ITEMS",
    "Restored",
    "corrupt_dir",
    "data_state_json",
    "latest_step_in",
    "model_config_from_meta",
    "resolve_ckpt_dir",
    "tree_checksums",
]
