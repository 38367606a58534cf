"""Pieces shared by the training CLIs: flag groups (defined on demand, so importing this module defines nothing),
distributed start-up, mesh construction and model initialisation with clear one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from absl import flags, logging

if TYPE_CHECKING:
    from flax import nnx
    from jax.sharding import Mesh

    from ring_jax.config import ModelConfig
    from ring_jax.data.tokenizer import Tokenizer

FLAGS = flags.FLAGS
T = TypeVar("T")


def define_model_flags(default_preset: str = "small") -> None:
    flags.DEFINE_string("preset", default_preset, "model preset (tiny, small, ling-lite-1.5); ignored with --hf_dir")
    flags.DEFINE_string("hf_dir", "", "initialise from this Hugging Face BailingMoe directory instead of a preset")
    flags.DEFINE_string(
        "init_ckpt",
        "",
        "initialise the parameters from this orbax checkpoint directory "
        "(latest step, or DIR:STEP); optimizer state starts fresh",
    )
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "compute dtype (default: the preset's / float32)")
    flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "parameter (master weight) dtype")
    flags.DEFINE_enum("moe_impl", None, ["dispatch", "ragged", "dense", "pallas"], "MoE compute path")
    flags.DEFINE_bool("remat", None, "rematerialise decoder layers in the backward pass")
    flags.DEFINE_enum(
        "remat_policy",
        None,
        ["nothing", "dots", "dots_no_batch"],
        "what a rematerialised layer saves for the backward pass (default nothing: the whole layer is recomputed)",
    )
    flags.DEFINE_bool(
        "scan_layers",
        None,
        "run the stacked decoder layers as one lax.scan (default; compile time "
        "independent of depth); --noscan_layers unrolls them over the same parameters",
    )
    flags.DEFINE_integer(
        "moe_tile",
        None,
        "dispatch path: one full row tile for the grouped expert loop instead of "
        "the automatic ladder (0: automatic; one tile compiles faster, same numerics)",
    )
    flags.DEFINE_float(
        "moe_capacity_factor",
        None,
        "expert-parallel capacity factor (default: dropless); tokens "
        "over ceil(factor * local tokens * k / experts) per expert are dropped and counted",
    )
    flags.DEFINE_integer(
        "attn_chunk",
        None,
        "long sequences: attention this many queries at a time (0: all; same "
        "numerics, scores memory [B, H, chunk, T] instead of [B, H, T, T])",
    )
    flags.DEFINE_integer(
        "moe_chunk",
        None,
        "long sequences: routed experts this many positions per row at a time "
        "(0: all; bounds the expert-dispatch buffers)",
    )
    flags.DEFINE_integer("seed", 0, "parameter-initialisation and PRNG seed")


def define_run_flags(out_dir: str, ckpt_every: int, keep: int, max_nonfinite: int) -> None:
    """The run flags the training CLIs share (``cli.run.TrainRun`` and ``train_loop`` read them), with each CLI's
    defaults."""
    flags.DEFINE_string("out_dir", out_dir, "run directory")
    flags.DEFINE_bool("resume", False, "continue from the newest readable checkpoint in --out_dir/ckpt")
    flags.DEFINE_integer("ckpt_every", ckpt_every, "checkpoint every N steps (0: only at the end)")
    flags.DEFINE_integer("keep", keep, "checkpoints to keep (0: all)")
    flags.DEFINE_integer("max_nonfinite", max_nonfinite, "stop after this many consecutive non-finite steps (0: never)")
    flags.DEFINE_bool("progress_bar", True, "show the progress bar")
    flags.DEFINE_float("step_delay_s", 0.0, "testing aid: sleep after every step")


def define_runtime_flags() -> None:
    flags.DEFINE_string("mesh", "", "device mesh, e.g. data:2,fsdp:2,expert:2 (default: every device on data)")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")


class _QuietLibraries:
    """absl-handler filter: drops INFO records of orbax / jax internals (a line per checkpoint item otherwise)."""

    PREFIXES = ("orbax", "jax", "grain")

    def filter(self, record) -> bool:
        if record.levelno >= 30:  # python logging.WARNING
            return True
        path = record.pathname.replace("\\", "/")
        return not any(f"/{p}/" in path for p in self.PREFIXES)


def quiet_library_logs() -> None:
    import logging as pylogging

    pylogging.getLogger("absl").addFilter(_QuietLibraries())


def usage(msg: str) -> NoReturn:
    """A bad flag or flag combination: one line on stderr, exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def init_distributed() -> None:
    import jax

    quiet_library_logs()
    if FLAGS.distributed:
        jax.distributed.initialize()
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)


def build_mesh(spec: str) -> Mesh:
    from ring_jax.sharding import ShardingError, make_mesh

    try:
        return make_mesh(spec)
    except ShardingError as e:
        usage(f"--mesh: {e}")


def runtime_overrides() -> dict:
    """The ModelConfig run-time fields (``config.RUNTIME_FIELDS``) that this CLI has a flag for and the user set."""
    from ring_jax.config import RUNTIME_FIELDS

    out = {}
    for name in RUNTIME_FIELDS:
        v = getattr(FLAGS, name, None)  # None: no such flag in this CLI, or left unset
        if v is not None:
            out[name] = v
    return out


def model_config_from_flags() -> ModelConfig:
    """ModelConfig from --hf_dir's config.json or --preset, with the run-time overrides."""
    from ring_jax.config import ConfigError, get_preset

    try:
        if FLAGS.hf_dir:
            from ring_jax.hf import CheckpointError, load_config

            try:
                return load_config(FLAGS.hf_dir, **runtime_overrides())
            except CheckpointError as e:
                usage(f"--hf_dir: {e}")
        return get_preset(FLAGS.preset, **runtime_overrides())
    except ConfigError as e:
        usage(str(e))


def init_params(
    cfg: ModelConfig, mesh: Mesh, seed: int = 0, hf_dir: str = "", materialize: bool = True
) -> tuple[nnx.GraphDef, nnx.State, dict[str, Any]]:
    """(graphdef, abstract parameter Variables, pure parameter tree placed by the rules table).

    Preset init runs inside ``jax.jit`` with sharded outputs, so no device ever holds the whole model.
    ``materialize=False`` returns ShapeDtypeStructs instead (e.g. when a checkpoint will be restored)."""
    import jax
    from flax import nnx

    from ring_jax.model.transformer import build_model
    from ring_jax.sharding import param_sharding_fn, state_shardings
    from ring_jax.train.step import split_model

    if hf_dir and materialize:
        from ring_jax.hf import load_pretrained

        model, _ = load_pretrained(
            hf_dir,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            shardings=param_sharding_fn(mesh),
            moe_impl=cfg.moe_impl,
            remat=cfg.remat,
            remat_policy=cfg.remat_policy,
            scan_layers=cfg.scan_layers,
            moe_capacity_factor=cfg.moe_capacity_factor,
            attn_chunk=cfg.attn_chunk,
            moe_chunk=cfg.moe_chunk,
        )
        graphdef, pvars, params = split_model(model)
        return graphdef, pvars, params
    abstract = nnx.eval_shape(lambda: build_model(cfg, seed))
    graphdef, pvars, _ = split_model(abstract)
    shardings = nnx.to_pure_dict(state_shardings(pvars, mesh))
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(build_model(cfg, seed))), out_shardings=shardings)
    params = init() if materialize else jax.eval_shape(init)
    return graphdef, pvars, params


def resolve_init_ckpt(cfg: ModelConfig) -> tuple[ModelConfig, str | None, str | None, int | None]:
    """--init_ckpt (``DIR`` or ``DIR:STEP``): (config, run dir, ckpt dir, step).  The checkpoint's own model config
    wins unless --hf_dir is given; an unreadable checkpoint is a one-line usage error."""
    if not FLAGS.init_ckpt:
        return cfg, None, None, None
    from ring_jax.train.checkpoint import Checkpointer, CheckpointError, model_config_from_meta, resolve_ckpt_dir

    ref, step = parse_ckpt_ref(FLAGS.init_ckpt)
    run_dir, ckpt_dir = resolve_ckpt_dir(ref)
    try:
        with Checkpointer(ckpt_dir, read_only=True) as c:
            meta = c.read_meta(step)
    except CheckpointError as e:
        usage(f"--init_ckpt: {e}")
    if not FLAGS.hf_dir:
        cfg = model_config_from_meta(meta, **runtime_overrides())
    return cfg, run_dir, ckpt_dir, step


def parse_ckpt_ref(ref: str) -> tuple[str, int | None]:
    """'DIR' or 'DIR:STEP' -> (DIR, STEP or None)."""
    head, sep, tail = ref.rpartition(":")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return ref, None


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_init_record(
    out_dir: str,
    ckpt_dir: str | None,
    step: int | None,
    params: dict[str, Any],
    chief: bool = True,
    **source: Any,
) -> None:
    """``<out_dir>/init.json``: where a run's parameters were initialised from -- the checkpoint (directory, step),
    or with ``ckpt_dir=None`` the ``source`` keywords (``hf_dir=...`` or ``preset=..., seed=...``) -- and their
    per-array checksums (``ring_jax.train.checkpoint.tree_checksums``, the list every checkpoint's meta stores under
    ``checksums.params``).  A chained run (``ring-jax-rl-schedule``) shows with it that it started exactly where the
    previous stage ended; a resumed RL run rebuilds its KL reference (the initial policy) from it and checks the
    checksums.  Every process computes the checksums (a collective); the chief writes the file."""
    import jax
    import numpy as np

    from ring_jax.train.checkpoint import tree_checksums

    sums = [int(v) for v in np.asarray(jax.device_get(tree_checksums(params)))]
    if chief:
        rec = {
            "init_ckpt": os.path.abspath(ckpt_dir) if ckpt_dir else None,
            "step": int(step) if step is not None else None,
            **source,
            "params_checksums": sums,
        }
        write_json(os.path.join(out_dir, "init.json"), rec)


def die(msg: str, code: int = 1, *, now: bool = False) -> NoReturn:
    """Print one line to stderr and exit (for failures after start-up, e.g. data or checkpoint errors).

    ``now``: exit without the interpreter's teardown (``os._exit``), for a failed checkpoint restore: orbax leaves
    tensorstore reads of the other arrays in flight, and their errors are printed (as unraisable exceptions, asyncio
    records, warnings) at any moment up to and during teardown, a traceback per array after the one error line.
    Nothing of ours is in flight when a restore fails (it happens before any step or save), so skipping teardown
    loses nothing."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def resume_point(ckpt_dir: str, resume: bool) -> int | None:
    """The checkpoint step a training run in ``ckpt_dir`` starts from, or None for a fresh start: the one rule of
    every training CLI, so that none starts from scratch over a run that had checkpoints.

    - ``ckpt_dir`` holds checkpoints: without ``resume`` a usage error (exit 2: pass --resume or choose another
      --out_dir); with it, the newest step.  Restoring may fall back to an older readable step; when none is
      readable the restore raises ``CheckpointError`` and moves nothing, and the caller ``die``s with it, so every
      later --resume fails the same way;
    - no checkpoint, but ``<ckpt_dir>.corrupt/`` holds quarantined ones: the run had checkpoints, refused (exit 1
      with ``resume``, exit 2 without);
    - neither: None (a fresh run; with ``resume`` logged as nothing to resume).
    """
    from ring_jax.train.checkpoint import corrupt_dir, latest_step_in

    latest = latest_step_in(ckpt_dir)
    if latest is not None:
        if not resume:
            usage(
                f"{ckpt_dir} already holds checkpoints (latest step {latest}); pass --resume to continue "
                "or choose another --out_dir"
            )
        return latest
    corrupt = corrupt_dir(ckpt_dir)
    quarantined = sorted(os.listdir(corrupt)) if os.path.isdir(corrupt) else []
    if quarantined:
        msg = (
            f"{ckpt_dir} holds no checkpoint, but {corrupt} holds {len(quarantined)} unreadable one(s) "
            f"({', '.join(quarantined[:4])}): refusing to start from scratch over a run that had checkpoints; "
            f"repair or remove {corrupt}, or choose another --out_dir"
        )
        if resume:
            die(msg)
        usage(msg)
    if resume:
        logging.info("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
    return None


def start_main(argv: list[str]) -> None:
    """The first step of a training CLI's ``main``: positional arguments are a usage error, then the distributed
    start-up (`init_distributed`)."""
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")
    init_distributed()


def dataclass_from_flags(
    cls: type[T],
    renames: Mapping[str, str] | None = None,
    flag_values: flags.FlagValues | None = None,
    **overrides: Any,
) -> T:
    """An instance of the dataclass ``cls`` whose fields come from the parsed flags.

    Each init field of ``cls`` takes, in this order: its value in ``overrides``; the value of the flag
    ``renames[field]``; the value of the flag of the same name, when ``flag_values`` (default: the global FLAGS)
    defines one; else the field's default.  E.g. ``dataclass_from_flags(RLConfig, {"num_micro": "micro_batches"},
    policy=dataclass_from_flags(PolicyLossConfig))``.  A name in ``renames`` or ``overrides`` that is not a field
    of ``cls`` is a TypeError (a typo would otherwise be ignored); the dataclass's own checks (``__post_init__``)
    raise as usual, e.g. ValueError, for the caller to report."""
    fv = FLAGS if flag_values is None else flag_values
    renames = dict(renames or {})
    fields = [f for f in dataclasses.fields(cls) if f.init]
    unknown = sorted((set(renames) | set(overrides)) - {f.name for f in fields})
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    kwargs = {}
    for f in fields:
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in renames:
            kwargs[f.name] = fv[renames[f.name]].value
        elif f.name in fv:
            kwargs[f.name] = fv[f.name].value
    return cls(**kwargs)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def holds_tokenizer(directory: str) -> bool:
    """Whether ``directory`` holds a tokenizer.json or tokenizer.model."""
    return bool(directory) and any(os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES)


def find_tokenizer(out_dir: str, init_run: str | None = None) -> tuple[Tokenizer, str] | None:
    """The tokenizer a training run uses and the path it was loaded from, or None when there is none to load (the
    caller then trains one, or works on token ids).  The one search order of the training CLIs, first match wins:

    1. ``--tokenizer``, when given (a directory with tokenizer.json / tokenizer.model, a tokenizer.json or a
       .model file); one that cannot be loaded is a usage error ``--tokenizer: ...``, never passed over;
    2. ``--hf_dir``, when it holds a tokenizer;
    3. ``<out_dir>/tokenizer``: the run's own, written when the run started (on --resume, the tokenizer its
       checkpoints were trained with);
    4. ``<init_run>/tokenizer``: that of the --init_ckpt run.

    A tokenizer found at 2-4 that cannot be loaded is a usage error ``tokenizer: ...``."""
    from ring_jax.data import load_tokenizer

    if FLAGS.tokenizer:
        path, what = FLAGS.tokenizer, "--tokenizer"
    else:
        own = os.path.join(out_dir, "tokenizer")
        found = [
            p
            for p in (FLAGS.hf_dir, own, os.path.join(init_run, "tokenizer") if init_run else "")
            if holds_tokenizer(p)
        ]
        if not found:
            return None
        path, what = found[0], "tokenizer"
    try:
        return load_tokenizer(path), path
    except (FileNotFoundError, ValueError) as e:
        usage(f"{what}: {e}")


__all__ = [
    "build_mesh",
    "dataclass_from_flags",
    "define_model_flags",
    "define_runtime_flags",
    "die",
    "find_tokenizer",
    "holds_tokenizer",
    "init_distributed",
    "init_params",
    "model_config_from_flags",
    "parse_ckpt_ref",
    "resume_point",
    "runtime_overrides",
    "start_main",
    "usage",
    "write_init_record",
    "write_json",
]
