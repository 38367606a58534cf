"""The sharded train step both sides of the multi-host test run: tiny model, mesh data:2,fsdp:2,expert:2 over all
8 devices, one SFT step on a fixed global batch (each process contributes its own rows)."""

import numpy as np


def fixed_batch(rows=16, t=16, vocab=128):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, t)).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": np.ones((rows, t), np.int32),
        "segment_ids": np.ones((rows, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
    }


def run_step(process_index=0, process_count=1):
    import jax

    from ring_jax.cli.common import init_params
    from ring_jax.config import get_preset
    from ring_jax.sharding import make_mesh
    from ring_jax.train.losses import LossConfig, sft_loss_fn
    from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer
    from ring_jax.train.step import (
        abstract_train_state,
        create_train_state,
        global_batch,
        make_train_step,
        train_state_shardings,
    )

    # a full MoE tile of 16 rows: 3 tile sizes in the dispatch ladder instead of 17, about half the compile time
    # of each of the test's three processes (the tile does not change what is compared: 1 vs 2 processes)
    cfg = get_preset("tiny", moe_tile=16)
    mesh = make_mesh("data:2,fsdp:2,expert:2")
    graphdef, pvars, params = init_params(cfg, mesh, seed=0)
    opt, sched = make_optimizer(OptimConfig(lr=1e-2, schedule="constant", warmup_steps=0), 4, decay_mask(pvars))
    sh = train_state_shardings(pvars, abstract_train_state(params, opt), mesh)
    state = create_train_state(params, opt, sh)
    step = make_train_step(graphdef, sft_loss_fn(LossConfig()), opt, mesh, sh, 2, schedule=sched)
    batch = fixed_batch()
    rows = len(batch["tokens"]) // process_count
    local = {k: v[process_index * rows : (process_index + 1) * rows] for k, v in batch.items()}
    with jax.set_mesh(mesh):
        state, m = step(state, global_batch(local, mesh))
        state, m2 = step(state, global_batch(local, mesh))  # a second step: the update itself agrees too
    return m2["loss"]
