"""The BailingMoe sparse MoE block: router, routed SwiGLU experts, shared experts; three XLA compute paths.

Router (reference behaviour): ``logits = x @ W_gate`` (no bias), softmax in float32, top-k on the probabilities,
renormalise the k weights to sum 1 only when k > 1 and ``norm_topk_prob``; no capacity, no token dropping.

Compute paths (``ModelConfig.moe_impl``):
- ``dense``: every expert on every token, combined with the routing weights.  The test oracle; cost grows with E.
- ``dispatch`` (default): sort the (token, slot) assignments by expert (``grouping.py``), then loop over the experts
  and run each expert's contiguous rows through its weights in row tiles (``grouped_xla.py``: a full tile of
  ``moe_tile`` rows, default 128, plus one tail tile from a ladder of sizes), with a custom_vjp whose backward writes
  the weight gradients in place; permute / un-permute are gathers both ways.  Dropless and exact; cost = routed work
  plus a small fixed cost per expert, nearly flat in E at fixed top-k (experiments/bench/bench_moe.py, which also
  times the earlier variant kept in experiments/bench/moe_gather.py: groups padded to tile multiples, the weights of
  every tile gathered, one batched matmul; its per-tile weight gather grows with E).
- ``ragged``: the same sort, with ``jax.lax.ragged_dot`` for the grouped matmuls (fast on GPU/TPU; on CPU it costs
  about as much as the dense path).
- ``capacity``: the sort again, then every expert's rows gathered into a fixed [E, C, H] block for three batched
  matmuls (:func:`moe_capacity`), falling back to dense / dispatch when a group outgrows C: the decode path on CPU.
- ``pallas``: the Pallas kernels of ``ring_kernels`` (folder ``kernels/``; interpret mode on CPU).

``MOE_PATHS`` maps each name to its function; :func:`moe_path` rejects an unknown name with the known ones.

The block also returns router statistics for the load-balance loss (``E * sum_i P_i F_i``) and the router z-loss
(mean over tokens of logsumexp(logits)^2), computed over real tokens only (``token_mask``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.model.grouped_xla import moe_grouped
from ring_jax.model.grouping import group_metadata
from ring_jax.model.layers import SwiGLU, dtype_of, param
from ring_jax.sharding import active_rules


class RouterStats(NamedTuple):
    balance_loss: jax.Array  # E * sum_i P_i F_i  (1.0 when perfectly balanced)
    z_loss: jax.Array  # mean_t logsumexp(logits_t)^2
    expert_load: jax.Array  # [E] number of (token, slot) assignments per expert
    dropped: jax.Array  # int32 assignments the expert-parallel capacity path dropped (0 on every other path)
    # [N, k] int32: the router's own top-k choice of every token (before any replay), for routing records
    own_ids: jax.Array | None = None


def routing_dtype(num_experts: int) -> jnp.dtype:
    """Storage type of recorded expert ids (``-1`` = no record): int8 up to 127 experts, else int16."""
    return jnp.dtype(jnp.int8) if num_experts <= 127 else jnp.dtype(jnp.int16)


def route(logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 softmax -> top-k -> optional renormalisation.  Returns (weights [N,k] f32, ids [N,k] int32, probs
    [N,E] f32: the full softmax, for the balance loss)."""
    return route_replay(logits, k, norm_topk_prob)[:3]


def route_replay(
    logits: jax.Array, k: int, norm_topk_prob: bool, replay: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`route` with an optional replay.  Returns (weights, ids, probs, own ids [N,k] int32: the router's own
    top-k, which equal ``ids`` without a replay).

    ``replay`` [N, k] (rollout routing replay): expert ids recorded by the sampler; a token whose first entry is
    >= 0 is sent to those experts instead of its own top-k, with gate weights read from this router's
    probabilities at those ids (renormalised as above), so the router is still trained.  ``-1`` rows (no record:
    padding, a response's last token) route by their own top-k."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, own = jax.lax.top_k(probs, k)
    own = own.astype(jnp.int32)
    if replay is None:
        ids, weights = own, top
    else:
        use = replay[:, :1] >= 0
        ids = jnp.where(use, replay.astype(jnp.int32), own)
        weights = jnp.take_along_axis(probs, ids, axis=-1)
    if k > 1 and norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, ids, probs, own


def router_stats(
    logits: jax.Array, probs: jax.Array, ids: jax.Array, token_mask: jax.Array, num_experts: int
) -> RouterStats:
    m = token_mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    k = ids.shape[-1]
    load = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32) * m[:, None, None], axis=(0, 1))
    frac_tokens = load / (n * k)
    mean_prob = jnp.sum(probs * m[:, None], axis=0) / n
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return RouterStats(
        num_experts * jnp.sum(frac_tokens * mean_prob), jnp.sum(lse * lse * m) / n, load, jnp.zeros((), jnp.int32)
    )


# ------------------------------------------------------------------------------------------------- compute paths
def _swiglu_experts_dense(x, wg, wu, wd):
    """x [N,H] through every expert: [E,N,H].  x is broadcast to [E,N,H] so that every matmul is a canonical
    batched one (batch dim leading on both operands): with ``"nh,ehf->enf"`` XLA:CPU relayouts the expert weights
    on every call (a full copy of wg / wu / wd), measured ~1.5-2x slower at decode sizes."""
    xe = jnp.broadcast_to(x[None], (wg.shape[0],) + x.shape)
    g = jnp.einsum("enh,ehf->enf", xe, wg)
    u = jnp.einsum("enh,ehf->enf", xe, wu)
    return jnp.einsum("enf,efh->enh", jax.nn.silu(g) * u, wd)


def moe_dense(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array
) -> jax.Array:
    y = _swiglu_experts_dense(x, wg, wu, wd)  # [E,N,H]
    comb = jnp.sum(jax.nn.one_hot(ids, wg.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)  # [N,E]
    return jnp.einsum("ne,enh->nh", comb, y.astype(jnp.float32))


def combine_sorted(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """y_sorted [M,H] in expert-sorted order (``order``: sorted row -> assignment, ``GroupMeta.order``) -> [N,H]
    float32 weighted sum over each token's k experts: scattered back to assignment order, then combined."""
    n, k = weights.shape
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(n, k, -1)
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights)


def moe_dispatch(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, tile: int = 0
) -> jax.Array:
    """The default path: dropless grouped SwiGLU (``grouped_xla.moe_grouped``); ``tile`` = full row tile (0: automatic,
    ``grouped_xla.auto_full_tile``)."""
    return moe_grouped(x, weights, ids, wg, wu, wd, tile)


def moe_ragged(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array
) -> jax.Array:
    e, k = wg.shape[0], ids.shape[1]
    meta = group_metadata(ids, e)
    xs = x[meta.order // k]
    g = jax.lax.ragged_dot(xs, wg, meta.sizes)
    u = jax.lax.ragged_dot(xs, wu, meta.sizes)
    y_sorted = jax.lax.ragged_dot(jax.nn.silu(g) * u, wd, meta.sizes)
    return combine_sorted(y_sorted, meta.order, weights)


CAPACITY_FACTOR = 1.5  # rows per expert of the capacity path, as a multiple of the mean group size
DENSE_FALLBACK_MAX_ROWS = 64  # the capacity path's fallback: all experts up to this many tokens, dispatch above


def capacity_rows(num_assignments: int, num_experts: int, factor: float = CAPACITY_FACTOR) -> int:
    """Static rows per expert of :func:`moe_capacity`: ``factor`` x the mean group size, a multiple of 8."""
    want = math.ceil(factor * num_assignments / max(1, num_experts))
    return max(8, -(-want // 8) * 8)


def moe_capacity(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, capacity: int = 0
) -> jax.Array:
    """Decode-sized grouped experts: every expert's assignments gathered into one [E, C, H] block (C static rows,
    zero-padded), three canonical batched matmuls [E, C, H] x [E, H, F], gathered back by assignment.  Built for
    the few hundred (token, slot) assignments of a decode step on CPU, where the dispatch path's per-expert loop is
    mostly fixed cost and the dense path runs E/k times the routed work.  Exact and dropless: when some expert has
    more than C assignments the same call computes the block with the all-experts path (up to
    ``DENSE_FALLBACK_MAX_ROWS`` tokens) or the dispatch path instead (``lax.cond``: only one branch runs).
    ``capacity``: C (0 = :func:`capacity_rows`)."""
    n, h = x.shape
    e, k = wg.shape[0], ids.shape[1]
    m = n * k
    c = capacity or capacity_rows(m, e)
    meta = group_metadata(ids, e)

    def blocks(x):
        slot = jnp.arange(c, dtype=jnp.int32)
        pos = jnp.minimum(meta.starts[:, None] + slot[None, :], m - 1)  # [E, C] sorted positions
        tok = jnp.where(slot[None, :] < meta.sizes[:, None], meta.order[pos] // k, n)  # n: the zero row
        xb = jnp.concatenate([x, jnp.zeros((1, h), x.dtype)])[tok]  # [E, C, H]
        g = jnp.einsum("ech,ehf->ecf", xb, wg)
        u = jnp.einsum("ech,ehf->ecf", xb, wu)
        y = jnp.einsum("ecf,efh->ech", jax.nn.silu(g) * u, wd).reshape(e * c, h)
        expert = ids.reshape(-1)
        row = expert * c + meta.inv - meta.starts[expert]  # each assignment's row in the blocks
        return jnp.einsum("nkh,nk->nh", y[row].reshape(n, k, h).astype(jnp.float32), weights)

    def fallback(x):
        if n <= DENSE_FALLBACK_MAX_ROWS:
            return moe_dense(x, weights, ids, wg, wu, wd)
        return moe_dispatch(x, weights, ids, wg, wu, wd)

    if c >= n:  # every expert fits (an expert holds at most one assignment per token)
        return blocks(x)
    return jax.lax.cond(jnp.max(meta.sizes) <= c, blocks, fallback, x)


def moe_pallas(
    x: jax.Array, weights: jax.Array, ids: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array
) -> jax.Array:
    from ring_kernels.ops import moe_ffn  # ring_kernels sits below model/ in the import order

    return moe_ffn(x, ids, weights, wg, wu, wd).astype(jnp.float32)


# ModelConfig.moe_impl -> the routed experts ``fn(x [N,H], weights [N,k], ids [N,k], wg, wu, wd) -> [N,H] float32``
# (the dispatch path also takes the block's ``tile``); the names are config.MOE_IMPLS
MOE_PATHS: dict[str, Callable[..., jax.Array]] = {
    "dispatch": moe_dispatch,
    "ragged": moe_ragged,
    "dense": moe_dense,
    "capacity": moe_capacity,
    "pallas": moe_pallas,
}


def moe_path(impl: str) -> Callable[..., jax.Array]:
    """The routed-expert function of ``impl`` (a ``ModelConfig.moe_impl``); a ValueError naming the known ones for
    any other name."""
    if impl not in MOE_PATHS:
        raise ValueError(f"unknown moe_impl {impl!r}: one of {', '.join(MOE_PATHS)}")
    return MOE_PATHS[impl]


# ------------------------------------------------------------------------------------------------- the block
class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        h, e, f = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
        self.gate = param(rngs, (h, e), ("embed", "router_experts"), cfg)
        self.experts_gate = param(rngs, (e, h, f), ("expert", "embed_moe", "expert_mlp"), cfg)
        self.experts_up = param(rngs, (e, h, f), ("expert", "embed_moe", "expert_mlp"), cfg)
        self.experts_down = param(rngs, (e, f, h), ("expert", "expert_mlp", "embed_moe"), cfg)
        # None = no shared MLP; 0 = a zero-width one that adds nothing (reference semantics).
        ns = cfg.num_shared_experts
        self.shared = SwiGLU(cfg, f * ns, rngs, axis="mlp") if ns else None
        moe_path(cfg.moe_impl)  # an unknown name fails here, not at the first call
        self.k, self.norm_topk, self.impl, self.tile = (
            cfg.num_experts_per_tok,
            cfg.norm_topk_prob,
            cfg.moe_impl,
            cfg.moe_tile,
        )
        self.num_experts = e
        self.capacity_factor = cfg.moe_capacity_factor
        self.ep_platform, self.ep_auto_ragged = cfg.ep_platform, cfg.ep_auto_ragged
        self.moe_chunk = cfg.moe_chunk
        self.dtype = dtype_of(cfg.dtype)

    def _routed(self, flat, weights, ids, wg, wu, wd):
        """Routed experts on tokens ``flat [N, H]``: (float32 [N, H], dropped assignments (int32; 0 unless the
        expert-parallel capacity path drops))."""
        from ring_jax.model import moe_ep  # expert parallelism when the active mesh has an expert axis > 1

        if moe_ep.expert_parallel_mesh(self.num_experts) is not None:
            return moe_ep.moe_expert_parallel(
                flat,
                weights,
                ids,
                wg,
                wu,
                wd,
                capacity_factor=self.capacity_factor,
                rules=active_rules(),
                platform=self.ep_platform,
                auto_ragged=self.ep_auto_ragged,
            )
        fn = moe_path(self.impl)
        if self.impl == "dispatch":
            fn = functools.partial(fn, tile=self.tile)
        return fn(flat, weights, ids, wg, wu, wd), jnp.zeros((), jnp.int32)

    def __call__(self, x, token_mask, replay=None):
        """x [B, T, H], token_mask [B, T]; ``replay`` [B, T, k] recorded expert ids (see :func:`route`) or None.
        Every compute path takes the (weights, ids) :func:`route` returns, so each honours a replay."""
        b, t, h = x.shape
        dt = self.dtype
        flat = x.reshape(b * t, h)
        logits = flat @ self.gate[...].astype(dt)
        rep = None if replay is None else replay.reshape(b * t, self.k)
        weights, ids, probs, own = route_replay(logits, self.k, self.norm_topk, rep)
        stats = router_stats(logits, probs, ids, token_mask.reshape(-1), self.num_experts)._replace(own_ids=own)
        experts = (self.experts_gate, self.experts_up, self.experts_down)
        c = self.moe_chunk
        if c and t > c and t % c == 0:
            # the routed experts moe_chunk positions of every row at a time (rows stay sharded over the batch axes),
            # each chunk rematerialised in the backward pass; the expert weights enter in float32 so that their
            # gradients accumulate over the chunks in float32
            n = t // c

            def split(a):
                return a.reshape(b, n, c, *a.shape[1:]).swapaxes(0, 1).reshape(n, b * c, *a.shape[1:])

            w32 = tuple(p[...].astype(jnp.float32) for p in experts)

            @jax.checkpoint
            def one(xc, wc, ic, w32):
                return self._routed(xc, wc, ic, *(w.astype(dt) for w in w32))

            def body(drop, xs):
                yc, d = one(*xs, w32)
                return drop + d, yc

            dropped, ys = jax.lax.scan(body, jnp.zeros((), jnp.int32), (split(flat), split(weights), split(ids)))
            y = ys.reshape(n, b, c, h).swapaxes(0, 1).reshape(b * t, h)
        else:
            y, dropped = self._routed(flat, weights, ids, *(p[...].astype(dt) for p in experts))
        y = y.astype(x.dtype).reshape(b, t, h)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, stats._replace(dropped=dropped.astype(jnp.int32))
