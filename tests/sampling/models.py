"""Random test models without eager JAX ops (abstract model filled from NumPy): building one costs no compilation,
which keeps the sampling tests fast on a shared 2-core machine."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ring_jax.model import abstract_model


def random_model(cfg, seed=0, scale=0.3):
    """Every parameter ~ N(0, scale^2); RMSNorm weights ~ 1 + N(0, scale^2) (as tests.helpers.randomize)."""
    model = abstract_model(cfg)
    rng = np.random.default_rng(seed)
    for path, var in sorted(nnx.iter_graph(model), key=lambda x: str(x[0])):
        if isinstance(var, nnx.Param):
            shape = var.get_value().shape
            base = 1.0 if path[-1] == "weight" and len(shape) == 1 else 0.0
            var.set_value(jnp.asarray(base + scale * rng.standard_normal(shape), jnp.dtype(cfg.param_dtype)))
    return model
