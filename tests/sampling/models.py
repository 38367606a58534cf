"""Random test models without eager JAX ops (abstract model filled from NumPy): building one costs no compilation,
which keeps the sampling tests fast on a shared 2-core machine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax.model import abstract_model
from tests.helpers import fill_unrolled


def random_model(cfg, seed=0, scale=0.3):
    """Every parameter ~ N(0, scale^2); RMSNorm weights ~ 1 + N(0, scale^2) (as tests.helpers.randomize)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape, dt):  # float64 draws cast once, as before the layers were stacked
        base = 1.0 if path[-1] == "weight" and len(shape) == 1 else 0.0
        return np.asarray(jnp.asarray(base + scale * rng.standard_normal(shape), jnp.dtype(cfg.param_dtype)))

    return fill_unrolled(abstract_model(cfg), draw)


T_REF = 32  # padded length of the reference forward (one compilation)


@functools.partial(jax.jit, static_argnums=(0,))
def _full_logits(graphdef, state, tokens, length):
    """Uncached forward of one sequence padded to T_REF (padding = segment 0): logits [T_REF, V]."""
    m = nnx.merge(graphdef, state)
    seg = (jnp.arange(T_REF) < length).astype(jnp.int32)[None]
    return m(tokens[None], segment_ids=seg).logits[0]


def full_logits(model, ids):
    """Logits [len(ids), V] of the uncached full forward of ``ids`` (at most T_REF tokens): the engines' oracle."""
    g, s = nnx.split(model)
    toks = np.zeros(T_REF, np.int32)
    toks[: len(ids)] = ids
    return np.asarray(_full_logits(g, s, toks, len(ids)))[: len(ids)]
