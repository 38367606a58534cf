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
        base = 1.0 if float(jnp.min(leaf)) == 1.0 == float(jnp.max(leaf)) else 0.0  # RMSNorm weights (stacked too)
        new.append((base + noise).astype(leaf.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def per_layer_ndim(path, shape) -> int:
    """Rank of a parameter per decoder layer (a pure-tree path): the stacked layers' leading axis does not count."""
    return len(shape) - any(getattr(k, "key", None) == "layers" for k in path)


def numpy_params(abstract, seed=0, scale=0.05, noisy_norms=False):
    """A pure parameter tree drawn with NumPy for the abstract tree ``abstract`` (nothing compiled): N(0, scale^2),
    except the 1-D-per-layer parameters (RMSNorm weights, biases), which are 1 (1 + N(0, scale^2) with
    ``noisy_norms``)."""
    rng = np.random.default_rng(seed)

    def one(path, a):
        norm = per_layer_ndim(path, a.shape) == 1
        noise = scale * rng.standard_normal(a.shape) if noisy_norms or not norm else np.zeros(a.shape)
        return ((1.0 if norm else 0.0) + noise).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, abstract)


def unrolled_params(module):
    """[(path, Param, j)] for every parameter of ``module`` as if each decoder layer were its own module (the layout
    before the layers were stacked): ``first_layers`` i and the stack's slice j both read ``('layers', i, ...)``;
    ``j`` is the slice of the stacked Param (None for an unstacked one).  Sorted by path, so NumPy draws in this order
    reproduce the models (and golden files) of that layout."""
    cfg = getattr(module, "config", None)
    k = cfg.num_first_layers if cfg is not None and hasattr(module, "first_layers") else None
    out = []
    for path, var in nnx.iter_graph(module):
        if not isinstance(var, nnx.Param):
            continue
        if k is not None and path[0] == "first_layers":
            out.append((("layers",) + tuple(path[1:]), var, None))
        elif k is not None and path[0] == "layers":
            out.extend((("layers", k + j) + tuple(path[1:]), var, j) for j in range(cfg.num_hidden_layers - k))
        else:
            out.append((tuple(path), var, None))
    return sorted(out, key=lambda x: str(x[0]))


def fill_unrolled(module, draw):
    """Set every parameter from ``draw(path, per-layer shape, dtype) -> np.ndarray`` over :func:`unrolled_params`."""
    values = {}
    for path, var, j in unrolled_params(module):
        shape, dt = var.get_value().shape, var.get_value().dtype
        if j is None:
            values[id(var)] = (var, draw(path, shape, dt))
        else:
            buf = values.setdefault(id(var), (var, np.empty(shape, dt)))[1]
            buf[j] = draw(path, shape[1:], dt)
    for var, v in values.values():
        var.set_value(jnp.asarray(v))
    return module


def randomize_np(module, seed=0, scale=0.3):
    """randomize's distribution drawn with NumPy, for a concrete or an abstract (nnx.eval_shape, e.g.
    ring_jax.model.abstract_model) module: every parameter ~ N(0, scale^2), the RMSNorm weights (the 1-D ``weight``
    parameters of a layer) ~ 1 + N(0, scale^2).  Nothing is compiled: randomize's jax.random draws and a concrete
    module's initialisers compile one small program per parameter shape (seconds per model on the 2-core box)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape, dt):
        base = 1.0 if path[-1] == "weight" and len(shape) == 1 else 0.0
        return np.asarray(base + scale * rng.standard_normal(shape), dt)

    return fill_unrolled(module, draw)


@functools.partial(jax.jit, static_argnums=0)
def _jit_logits(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids).logits


def logits(model, tokens, positions=None, segment_ids=None) -> np.ndarray:
    """The model's float32 logits from one jitted forward (an eager module call compiles every op on its own, which
    on CPU costs tens of seconds per new shape)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_logits(graphdef, state, jnp.asarray(tokens), positions, segment_ids))
