"""Shared test helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomize(model, seed=0, scale=0.3):
    """Give every parameter non-trivial random values (norm weights around 1) so parity tests exercise them."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for k, leaf in zip(keys, leaves):
        noise = scale * jax.random.normal(k, leaf.shape, jnp.float32)
        base = 1.0 if leaf.ndim == 1 and float(jnp.min(leaf)) == 1.0 else 0.0
        new.append((base + noise).astype(leaf.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids).logits


def logits(model, tokens, positions=None, segment_ids=None) -> np.ndarray:
    """The model's float32 logits from one jitted forward (an eager module call compiles every op on its own, which
    on CPU costs tens of seconds per new shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_logits(graphdef, state, jnp.asarray(tokens), positions, segment_ids))
