"""ring-jax-import: a Hugging Face BailingMoe directory -> a parameters-only orbax checkpoint (step 0 by default).

    ring-jax-import --hf_dir=/models/Ling-lite-1.5 --out_dir=runs/ling_init --mesh=fsdp:16,expert:8
    ring-jax-sft --init_ckpt=runs/ling_init ...        # start SFT from it (fresh optimizer state)
    ring-jax-import --hf_dir=... --out_dir=... --param_dtype=bfloat16 --stream   # a model larger than host RAM

The parameters are loaded straight into their shards (``--mesh``) and written by every process; the config goes
into the checkpoint's metadata and ``<out_dir>/config.json``, the tokenizer (if the HF directory has one) into
``<out_dir>/tokenizer/``.  A non-empty --out_dir is refused unless --overwrite is given (then its old contents are
removed first), so a run directory never holds one model's checkpoint beside another's config.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from absl import app, flags

from ring_jax.cli import common
from ring_jax.cli.common import usage

if TYPE_CHECKING:
    from jax.sharding import Mesh

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("hf_dir", None, "Hugging Face directory (config.json + safetensors)")
    flags.DEFINE_string("out_dir", None, "run directory to create; the checkpoint goes to <out_dir>/ckpt")
    flags.DEFINE_bool(
        "overwrite",
        False,
        "--out_dir may be non-empty: everything in it is deleted (once the HF "
        "directory has loaded) and replaced by the import; without it a non-empty --out_dir is refused",
    )
    flags.DEFINE_integer("step", 0, "step number of the written checkpoint")
    flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "stored parameter dtype")
    flags.DEFINE_bool(
        "stream",
        False,
        "convert one decoder layer at a time, never holding the model: host memory "
        "stays near one layer (for a model larger than the host's RAM; one process only)",
    )
    common.define_runtime_flags()
    flags.mark_flags_as_required(["hf_dir", "out_dir"])


def import_hf(
    hf_dir: str,
    out_dir: str,
    step: int = 0,
    param_dtype: str = "float32",
    mesh: Mesh | None = None,
    overwrite: bool = False,
    stream: bool = False,
) -> str:
    """Write ``<out_dir>/ckpt/<step>`` (parameters + meta) from an HF directory; returns the checkpoint dir.
    ``out_dir`` should be new or empty; ``overwrite`` first empties it (after the HF directory has loaded, or with
    ``stream`` after its config and tensor shapes have checked out, so a bad one leaves it untouched).  ``stream``:
    ``ring_jax.hf_stream`` writes the same checkpoint one layer at a time."""
    import jax

    from ring_jax.hf import SafetensorsReader, load_config, load_pretrained
    from ring_jax.sharding import param_sharding_fn
    from ring_jax.train.checkpoint import Checkpointer
    from ring_jax.train.step import split_model

    if stream:
        from ring_jax.hf_stream import check_tensors

        cfg = load_config(hf_dir, param_dtype=param_dtype)
        check_tensors(cfg, SafetensorsReader(hf_dir))
        params = None
    else:
        model, cfg = load_pretrained(
            hf_dir, param_dtype=param_dtype, shardings=param_sharding_fn(mesh) if mesh is not None else None
        )
        _, _, params = split_model(model)
    tokenizer = None
    if any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer.model")):
        from ring_jax.data import load_tokenizer

        tokenizer = load_tokenizer(hf_dir)
    if overwrite:
        _empty_dir(out_dir)
    ckpt_dir = os.path.join(os.path.abspath(out_dir), "ckpt")
    meta = {
        "model_config": cfg.to_hf_dict(),
        "runtime": {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype},
        "source": os.path.abspath(hf_dir),
    }
    if stream:
        from ring_jax.hf_stream import import_hf_streaming

        import_hf_streaming(hf_dir, ckpt_dir, step, param_dtype, mesh, meta=meta)
    else:
        ckpt = Checkpointer(ckpt_dir, keep=None)
        ckpt.save(step, params=params, meta=meta, wait=True)
        ckpt.close()
    if jax.process_index() == 0:
        common.write_json(os.path.join(out_dir, "config.json"), cfg.to_hf_dict())
        if tokenizer is not None:
            tokenizer.save(os.path.join(out_dir, "tokenizer"))
    return ckpt_dir


def _empty_dir(path: str) -> None:
    """Delete everything inside ``path`` (process 0; the others wait for it), keeping the directory itself."""
    import jax

    if jax.process_index() == 0 and os.path.isdir(path):
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ring_jax_import_empty_out_dir")


def _check_out_dir(hf_dir: str, out_dir: str, overwrite: bool) -> None:
    """Refuse (usage error) an --out_dir that already has contents unless --overwrite, and an --overwrite that
    would delete the --hf_dir being imported."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        usage(f"--out_dir {out_dir}: not a directory")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not overwrite:
        usage(
            f"--out_dir {out_dir} is not empty (holds {', '.join(sorted(os.listdir(out_dir))[:4])}); pass "
            "--overwrite to replace its contents, or choose another --out_dir"
        )
    out, src = os.path.realpath(out_dir), os.path.realpath(hf_dir)
    if os.path.commonpath([out, src]) == out:
        usage(f"--hf_dir {hf_dir} is inside --out_dir {out_dir}: --overwrite would delete it")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        usage(f"unexpected arguments: {' '.join(argv[1:])}")
    if not os.path.isdir(FLAGS.hf_dir):
        usage(f"--hf_dir {FLAGS.hf_dir}: not a directory")
    _check_out_dir(FLAGS.hf_dir, FLAGS.out_dir, FLAGS.overwrite)
    common.init_distributed()
    from ring_jax.config import ConfigError
    from ring_jax.hf import CheckpointError as HFError
    from ring_jax.train.checkpoint import CheckpointError

    mesh = common.build_mesh(FLAGS.mesh) if FLAGS.mesh else None
    try:
        ckpt_dir = import_hf(
            FLAGS.hf_dir, FLAGS.out_dir, FLAGS.step, FLAGS.param_dtype, mesh, FLAGS.overwrite, FLAGS.stream
        )
    except (HFError, ConfigError, CheckpointError) as e:
        common.die(str(e))
    print(f"imported {FLAGS.hf_dir} -> {ckpt_dir}/{FLAGS.step}", flush=True)


def run() -> None:
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
