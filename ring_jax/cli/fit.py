"""ring-jax-fit: will it fit?  Compile the train step (and a decode step) for a preset on a mesh of N devices against
abstract arrays (nothing allocated, no accelerator needed) and print XLA's per-device memory analysis.

    ring-jax-fit --preset=ling-lite-1.5 --devices=64 --mesh=fsdp:8,expert:8 --seq_len=4096 --global_batch=64

The devices are fake CPU devices (``--xla_force_host_platform_device_count``), so the figures are XLA's CPU memory
analysis of the same sharded program: parameters, optimizer state and batch per device are exact; temporaries
(activations) depend on the backend's fusion and are indicative.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("preset", "ling-lite-1.5", "model preset")
    flags.DEFINE_integer("devices", 64, "number of (fake) devices of the mesh")
    flags.DEFINE_string("mesh", "fsdp:8,expert:8", "mesh spec over --devices")
    flags.DEFINE_integer("seq_len", 4096, "train row length")
    flags.DEFINE_integer("global_batch", 64, "rows per step")
    flags.DEFINE_integer("micro_batches", 1, "micro-batches per step")
    flags.DEFINE_integer("num_layers", 0, "override num_hidden_layers (0: the preset's); memory scales per layer")
    flags.DEFINE_bool("remat", True, "rematerialise decoder layers")
    flags.DEFINE_integer("ce_chunk", 1024, "chunked cross-entropy positions (0: full logits)")


def _gib(x):
    return f"{x / 2**30:8.2f} GiB"


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from ring_jax.config import get_preset
    from ring_jax.model.transformer import build_model
    from ring_jax.sharding import make_mesh
    from ring_jax.train.losses import LossConfig, sft_loss_fn
    from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
    from ring_jax.train.step import abstract_train_state, make_train_step, split_model, train_state_shardings

    over = {"remat": FLAGS.remat}
    if FLAGS.num_layers:
        over["num_hidden_layers"] = FLAGS.num_layers
    cfg = get_preset(FLAGS.preset, **over)
    mesh = make_mesh(FLAGS.mesh)
    graphdef, pvars, params = split_model(nnx.eval_shape(lambda: build_model(cfg)))
    opt, sched = make_optimizer(OptimConfig(), 1000, decay_mask(pvars))
    abstract = abstract_train_state(params, opt)
    sh = train_state_shardings(pvars, abstract, mesh)
    step = make_train_step(graphdef, sft_loss_fn(LossConfig(ce_chunk=FLAGS.ce_chunk)), opt, mesh, sh,
                           FLAGS.micro_batches, schedule=sched)
    b, t = FLAGS.global_batch, FLAGS.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32) for k in
             ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
    # build the jitted function through one call path without running it: lower the cached jit
    try:
        step(abstract, batch)
    except Exception:  # noqa: BLE001 - abstract inputs cannot run; the compiled function is cached already
        pass
    fn = next(iter(step.compiled.values()))
    with jax.set_mesh(mesh):
        compiled = fn.lower(abstract, batch).compile()
    ma = compiled.memory_analysis()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"{FLAGS.preset}: {n_params / 1e9:.2f}B parameters, {cfg.num_hidden_layers} layers, mesh {dict(mesh.shape)}, "
          f"batch {b} x {t}, {FLAGS.micro_batches} micro-batch(es), remat={FLAGS.remat}, "
          f"dtype {cfg.dtype} / params {cfg.param_dtype}")
    print("per device (XLA memory analysis of the compiled train step):")
    print(f"  arguments (params + optimizer state + batch): {_gib(ma.argument_size_in_bytes)}")
    print(f"  outputs (aliased with donated arguments):     {_gib(ma.output_size_in_bytes)}")
    print(f"  temporaries (activations, gradients):         {_gib(ma.temp_size_in_bytes)}")
    peak = ma.argument_size_in_bytes + ma.temp_size_in_bytes
    print(f"  peak estimate (arguments + temporaries):      {_gib(peak)}")


def run():
    define_flags()
    # fake devices must be configured before jax initialises its backends
    argv = sys.argv
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--devices=")), "64")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main)


if __name__ == "__main__":
    run()
