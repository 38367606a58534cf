"""Shared test helpers."""

import jax
import jax.numpy as jnp
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
