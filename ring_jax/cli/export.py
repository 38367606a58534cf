"""ring-jax-export: an orbax training checkpoint -> a Hugging Face BailingMoe directory (ring_jax.hf layout).

    ring-jax-export --ckpt_dir=runs/sft --out_dir=runs/sft/hf                 # newest readable step
    ring-jax-export --ckpt_dir=runs/sft/ckpt --step=400 --out_dir=hf --dtype=float32

``--ckpt_dir`` is a run directory (holding ``ckpt/``) or the checkpoint directory itself.  The model config comes
from the checkpoint's metadata; the run's ``tokenizer/`` (or --tokenizer) is written alongside the weights.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from absl import app, flags

from ring_jax.cli import common
from ring_jax.cli.common import usage

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from ring_jax.model.transformer import BailingMoeForCausalLM

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("ckpt_dir", None, "run directory or its ckpt/ directory")
    flags.DEFINE_integer("step", -1, "checkpoint step (-1: the newest readable one)")
    flags.DEFINE_string("out_dir", None, "Hugging Face directory to write")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32", "float16"], "dtype of the written tensors")
    flags.DEFINE_string("tokenizer", "", "tokenizer to include (default: the run directory's tokenizer/)")
    flags.DEFINE_string("max_shard_size", "2GB", "safetensors shard size")
    flags.DEFINE_bool(
        "stream",
        False,
        "read and write one decoder layer at a time, never holding the model (for a "
        "model larger than the host's RAM; one process, --mesh is not used)",
    )
    common.define_runtime_flags()
    flags.mark_flags_as_required(["ckpt_dir", "out_dir"])


def restore_model(
    ckpt_dir: str, step: int | None = None, mesh: Mesh | None = None, **overrides: Any
) -> tuple[BailingMoeForCausalLM, str, int]:
    """(model, run_dir, step) from an orbax run / ckpt directory (newest readable step when None)."""
    from flax import nnx

    from ring_jax.model.transformer import build_model
    from ring_jax.sharding import state_shardings
    from ring_jax.train.checkpoint import Checkpointer, model_config_from_meta, resolve_ckpt_dir
    from ring_jax.train.step import split_model

    run_dir, ckpt_dir = resolve_ckpt_dir(ckpt_dir)
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:
        cfg = model_config_from_meta(ckpt.read_meta(step), **overrides)
        graphdef, pvars, abstract = split_model(nnx.eval_shape(lambda: build_model(cfg)))
        shardings = nnx.to_pure_dict(state_shardings(pvars, mesh)) if mesh is not None else None
        restored = ckpt.restore_params(abstract, shardings, step)
    return nnx.merge(graphdef, restored.params), run_dir, restored.step


def export_checkpoint(
    ckpt_dir: str,
    out_dir: str,
    step: int | None = None,
    dtype: str = "bfloat16",
    tokenizer: str = "",
    mesh: Mesh | None = None,
    max_shard_size: str = "2GB",
    stream: bool = False,
) -> tuple[str, int]:
    """Restore the parameters of ``step`` (newest readable when None) into a model and ``save_pretrained`` it
    (``stream``: ``ring_jax.hf_stream`` writes the same files one layer at a time).  Returns (out_dir, step)."""
    from ring_jax.hf import save_pretrained
    from ring_jax.train.checkpoint import resolve_ckpt_dir

    if stream:
        run_dir, ckpt_path = resolve_ckpt_dir(ckpt_dir)
    else:
        model, run_dir, step = restore_model(ckpt_dir, step, mesh)
    tok = None
    tok_path = tokenizer or os.path.join(run_dir, "tokenizer")
    if os.path.isdir(tok_path) or os.path.isfile(tok_path):
        from ring_jax.data import load_tokenizer

        try:
            tok = load_tokenizer(tok_path)
        except FileNotFoundError:
            if tokenizer:
                raise
    if stream:
        from ring_jax.hf_stream import export_streaming

        return export_streaming(ckpt_path, step, out_dir, dtype, tok, max_shard_size)
    save_pretrained(model, out_dir, tokenizer=tok, dtype=dtype, max_shard_size=max_shard_size)
    return out_dir, step


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")
    common.init_distributed()
    from ring_jax.train.checkpoint import CheckpointError

    mesh = common.build_mesh(FLAGS.mesh) if FLAGS.mesh else None
    try:
        out, step = export_checkpoint(
            FLAGS.ckpt_dir,
            FLAGS.out_dir,
            None if FLAGS.step < 0 else FLAGS.step,
            FLAGS.dtype,
            FLAGS.tokenizer,
            mesh,
            FLAGS.max_shard_size,
            FLAGS.stream,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        common.die(str(e))
    print(f"exported step {step} of {FLAGS.ckpt_dir} to {out}", flush=True)


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
