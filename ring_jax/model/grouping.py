"""Sort by expert: the one grouping of the M = N*k (token, slot) assignments by expert id that every MoE path uses
(``moe.py``'s ragged and capacity paths, ``grouped_xla.py``, the expert-parallel paths in ``moe_ep.py``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMeta(NamedTuple):
    order: jax.Array  # [M] sorted row -> assignment index (n*k + j for ids [N, k])
    inv: jax.Array  # [M] assignment index -> sorted row
    starts: jax.Array  # [E] first sorted row of each group
    sizes: jax.Array  # [E] assignments per group


def group_metadata(ids: jax.Array, num_groups: int) -> GroupMeta:
    """Stable sort of the flattened ``ids`` (int32, each in [0, num_groups)): the rows of group g are
    [starts[g], starts[g] + sizes[g]) in assignment order.  All four arrays int32; under jit the ones a caller does
    not read are never computed."""
    flat = ids.reshape(-1).astype(jnp.int32)
    m = flat.shape[0]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    inv = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32), unique_indices=True)
    sizes = jnp.bincount(flat, length=num_groups).astype(jnp.int32)
    return GroupMeta(order, inv, jnp.cumsum(sizes) - sizes, sizes)
