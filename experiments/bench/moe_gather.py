"""The earlier dispatch path of the MoE block, kept for comparison in bench_moe.py (no longer a ``moe_impl``): each
expert's group padded to a multiple of a row tile, the weights of every tile gathered, one batched matmul.  Its
per-tile weight gather grows with the number of experts, which the library's dispatch path
(ring_jax/model/grouped_xla.py) avoids."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ring_jax.model.grouping import group_metadata
from ring_jax.model.moe import combine_sorted


def auto_tile(num_assignments: int, num_experts: int) -> int:
    """Token tile for ``moe_dispatch_gather``: about a quarter of the mean group size, a power of two in [8, 128], so
    padding (< one tile per expert) stays small next to the routed work."""
    mean = max(1, num_assignments // max(1, num_experts))
    t = 8
    while t * 2 <= min(128, max(8, mean // 4)):
        t *= 2
    return t


def moe_dispatch_gather(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, tile: int = 0
) -> jax.Array:
    """Routed SwiGLU experts [N,H] float32 with groups padded to tile multiples and a per-tile weight gather
    (``tile`` 0: :func:`auto_tile`)."""
    n, h = x.shape
    e, k = wg.shape[0], ids.shape[1]
    m = n * k
    tile = tile or auto_tile(m, e)
    meta = group_metadata(ids, e)
    padded = (meta.sizes + tile - 1) // tile * tile
    pstart = jnp.cumsum(padded) - padded
    e_sorted = ids.reshape(-1)[meta.order]
    dest = pstart[e_sorted] + jnp.arange(m, dtype=jnp.int32) - meta.starts[e_sorted]  # padded row of each sorted row
    num_tiles = -(-(m + e * (tile - 1)) // tile)  # static bound on the padded length / tile
    xs = jnp.zeros((num_tiles * tile, h), x.dtype).at[dest].set(x[meta.order // k])
    tile_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_tiles) * tile, side="right")
    tile_expert = jnp.minimum(tile_expert, e - 1)  # tiles past the end hold zeros; any expert will do
    xt = xs.reshape(num_tiles, tile, h)
    g = jnp.einsum("nth,nhf->ntf", xt, wg[tile_expert])
    u = jnp.einsum("nth,nhf->ntf", xt, wu[tile_expert])
    yt = jnp.einsum("ntf,nfh->nth", jax.nn.silu(g) * u, wd[tile_expert])
    y_sorted = yt.reshape(num_tiles * tile, h)[dest]
    return combine_sorted(y_sorted, meta.order, weights)
