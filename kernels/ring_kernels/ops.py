"""The routed-expert SwiGLU of the BailingMoe block through the Pallas kernels, and its dense jnp oracle.

moe_ffn: expert_metadata -> permute -> gmm(gate), gmm(up) -> silu(gate) * up -> gmm(down) -> unpermute_combine.
Every step is differentiable w.r.t. x, the routing weights and the three expert weight stacks (custom_vjps in
gmm.py and combine.py); ids are integers and carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ring_kernels.combine import permute, unpermute_combine
from ring_kernels.gmm import GmmTiling, Tile, gmm
from ring_kernels.routing import expert_metadata


def moe_ffn(
    x: jax.Array,
    ids: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    tiling: Tile | GmmTiling | dict[str, Tile | GmmTiling | None] | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """x [T,H], ids [T,k] int32, weights [T,k] f32, w_gate/w_up [E,H,F], w_down [E,F,H] -> [T,H] in x.dtype.

    ``tiling``: None (defaults), one (tm, tk, tn) tuple for every gmm pass, or a GmmTiling (per pass), or a dict
    {"gate_up": ..., "down": ...} of either (the two gmm shapes differ: H->F and F->H).
    """
    t, h = x.shape
    e = w_gate.shape[0]
    k = ids.shape[1]
    if isinstance(tiling, dict):
        t_gu, t_dn = tiling.get("gate_up"), tiling.get("down")
    else:
        t_gu = t_dn = tiling
    t_gu = GmmTiling() if t_gu is None else t_gu
    t_dn = GmmTiling() if t_dn is None else t_dn

    meta = expert_metadata(ids.astype(jnp.int32), e, interpret=interpret)
    xs = permute(x, meta, k, interpret=interpret)  # [T*k, H]
    g = gmm(xs, w_gate, meta.group_sizes, tiling=t_gu, interpret=interpret)  # float32
    u = gmm(xs, w_up, meta.group_sizes, tiling=t_gu, interpret=interpret)
    a = (jax.nn.silu(g) * u).astype(x.dtype)
    y = gmm(a, w_down, meta.group_sizes, tiling=t_dn, interpret=interpret)  # [T*k, H] float32
    return unpermute_combine(y, meta, weights.astype(jnp.float32), interpret=interpret).astype(x.dtype)


def moe_ffn_ref(
    x: jax.Array, ids: jax.Array, weights: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Dense oracle: every expert on every token, combined with the routing weights (zero for unrouted experts)."""
    e = w_gate.shape[0]
    g = jnp.einsum("th,ehf->etf", x, w_gate, preferred_element_type=jnp.float32)
    u = jnp.einsum("th,ehf->etf", x, w_up, preferred_element_type=jnp.float32)
    a = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jnp.einsum("etf,efh->eth", a, w_down, preferred_element_type=jnp.float32)
    comb = jnp.sum(jax.nn.one_hot(ids, e, dtype=jnp.float32) * weights.astype(jnp.float32)[..., None], axis=1)
    return jnp.einsum("te,eth->th", comb, y).astype(x.dtype)
