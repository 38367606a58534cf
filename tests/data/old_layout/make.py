"""Writes tests/data/old_layout/: a checkpoint in the layout before the decoder layers were stacked (one subtree per
layer, ``layers/0 .. layers/L-1``), by the code of that layout.  Run once, at commit 2031a91 (the last one with
unrolled layers), from a checkout of it:

    PYTHONPATH=<checkout> python tests/data/old_layout/make.py <this folder>

Tiny preset, random parameters and random Adam moments (so a moment mapped to the wrong layer is visible), one
TrainState at step 5; ``expected.npz`` holds the old model's logits on fixed tokens and every optimizer leaf by its
old path, for tests/train/test_checkpoint.py::test_old_layout_checkpoint_restores_stacked."""

import os
import shutil
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ring_jax.config import get_preset  # noqa: E402
from ring_jax.sharding import make_mesh  # noqa: E402
from ring_jax.train.checkpoint import Checkpointer  # noqa: E402
from ring_jax.train.optim import OptimConfig, decay_mask, make_optimizer  # noqa: E402
from ring_jax.train.step import abstract_train_state, create_train_state, train_state_shardings  # noqa: E402
from tests.train.test_step import random_params  # noqa: E402

out = os.path.abspath(sys.argv[1])
cfg = get_preset("tiny")
graphdef, pvars, params = random_params(cfg, seed=3)
opt, _ = make_optimizer(OptimConfig(), 10, decay_mask(pvars))
mesh = make_mesh("data:1", devices=jax.devices()[:1])
sh = train_state_shardings(pvars, abstract_train_state(params, opt), mesh)
state = create_train_state(params, opt, sh)
rng = np.random.default_rng(11)
state = state._replace(
    opt_state=jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) if x.dtype == np.float32 else x).astype(x.dtype), state.opt_state
    ),
    step=np.int32(5),
)
shutil.rmtree(os.path.join(out, "ckpt"), ignore_errors=True)
ck = Checkpointer(os.path.join(out, "ckpt"))
ck.save(5, state, {"next_index": 7}, {"model_config": cfg.to_hf_dict()}, wait=True)
ck.close()
tokens = (np.arange(2 * 9).reshape(2, 9) * 7) % cfg.vocab_size
logits = np.asarray(
    jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)(jax.tree.map(jax.numpy.asarray, params), tokens)
)
leaves = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
np.savez(os.path.join(out, "expected.npz"), tokens=tokens, logits=logits, **{"opt" + k: v for k, v in leaves.items()})
print(sorted(leaves)[:6])
