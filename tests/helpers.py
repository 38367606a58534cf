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


def randomize_np(module, seed=0, scale=0.3):
    """randomize's distribution drawn with NumPy, for a concrete or an abstract (nnx.eval_shape, e.g.
    ring_jax.model.abstract_model) module: every parameter ~ N(0, scale^2), the RMSNorm weights (the 1-D ``weight``
    parameters) ~ 1 + N(0, scale^2).  Nothing is compiled: randomize's jax.random draws and a concrete module's
    initialisers compile one small program per parameter shape (seconds per model on the 2-core box)."""
    rng = np.random.default_rng(seed)
    for path, var in sorted(nnx.iter_graph(module), key=lambda x: str(x[0])):
        if isinstance(var, nnx.Param):
            value = var.get_value()
            base = 1.0 if path[-1] == "weight" and len(value.shape) == 1 else 0.0
            var.set_value(jnp.asarray(np.asarray(base + scale * rng.standard_normal(value.shape), value.dtype)))
    return module


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids).logits


def logits(model, tokens, positions=None, segment_ids=None) -> np.ndarray:
    """The model's float32 logits from one jitted forward (an eager module call compiles every op on its own, which
    on CPU costs tens of seconds per new shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_logits(graphdef, state, jnp.asarray(tokens), positions, segment_ids))
