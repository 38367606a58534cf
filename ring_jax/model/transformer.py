"""BailingMoeForCausalLM in Flax NNX: embeddings -> decoder layers (attention + MoE or dense MLP) -> norm -> lm_head.

Inputs are ``tokens`` [B, T] with ``segment_ids`` (0 = padding; packed documents carry 1, 2, ...) and
``positions`` (restart at 0 per document; for a left-padded prompt the first real token is position 0, as the
reference's ``cumsum(attention_mask) - 1``).  Logits come back in float32 with the router statistics that the
load-balance and z losses need.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig
from ring_jax.model.attention import Attention, CacheView, LayerCache
from ring_jax.model.layers import RMSNorm, SwiGLU, dtype_of, param, rope_cos_sin
from ring_jax.model.moe import MoEBlock, RouterStats
from ring_jax.utils import is_variable


class KVCache(NamedTuple):
    """The KV cache of every decoder layer, stacked on a leading layer axis (the scanned layers carry it and write
    only this call's positions; no layer's cache is copied out and back)."""

    k: jax.Array  # [L, B, KVH, D, S] post-RoPE keys, transposed (("layers",) + attention.K_CACHE_AXES)
    v: jax.Array  # [L, B, KVH, S, D] (("layers",) + attention.CACHE_AXES)
    segment_ids: jax.Array  # [B, S] 0 = empty slot
    positions: jax.Array  # [B, S]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> KVCache:
    dt = dtype_of(dtype or cfg.dtype)
    n = cfg.num_hidden_layers
    return KVCache(
        jnp.zeros((n, batch, cfg.kv_heads, cfg.head_size, max_len), dt),
        jnp.zeros((n, batch, cfg.kv_heads, max_len, cfg.head_size), dt),
        jnp.zeros((batch, max_len), jnp.int32),
        jnp.zeros((batch, max_len), jnp.int32),
    )


# what a rematerialised decoder layer saves for the backward pass (ModelConfig.remat_policy)
REMAT_POLICIES = {
    "nothing": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Output(NamedTuple):
    logits: jax.Array | None  # [B, T, V] float32 (None when skipped)
    balance_loss: jax.Array  # mean over MoE layers of E * sum_i P_i F_i
    z_loss: jax.Array  # mean over MoE layers of the router z-loss
    expert_load: jax.Array  # [num_moe_layers, E] assignments per expert
    moe_dropped: jax.Array  # [num_moe_layers] int32 assignments dropped by the expert-parallel capacity path
    cache: KVCache | None
    hidden: jax.Array | None  # final normed hidden states [B, T, H] when asked for
    # [B, T, num_moe_layers, k] int32 when asked for (return_routing): each token's top-k experts as its router
    # chose them (with a routing replay, the choice the replay overrode)
    routing: jax.Array | None = None


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, idx: int, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg, rngs)
        self.is_moe = cfg.is_moe_layer(idx)
        self.mlp = MoEBlock(cfg, rngs) if self.is_moe else SwiGLU(cfg, cfg.intermediate_size, rngs)

    def __call__(self, x, cos, sin, segment_ids, positions, cache=None, view=None, layer=None, replay=None):
        """``cache``: the whole stacked (k, v) of :class:`KVCache` as a LayerCache, ``layer`` this layer's index in
        it (static or traced); returned with this call's positions written.  ``replay`` [B, T, k]: recorded expert
        ids for this (MoE) layer (``moe.route_replay``)."""
        a, new_cache = self.attention(self.input_layernorm(x), cos, sin, segment_ids, positions, cache, view, layer)
        x = x + a
        hn = self.post_attention_layernorm(x)
        if self.is_moe:
            m, stats = self.mlp(hn, segment_ids != 0, replay)
        else:
            m, stats = self.mlp(hn), None
        return x + m, stats, new_cache


def stack_layers(layers: list[DecoderLayer]) -> DecoderLayer:
    """One DecoderLayer whose parameters are those of ``layers`` (all of one shape) stacked on a new leading axis,
    named ``layers`` in their logical axes."""
    graphdef, _ = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(lyr) for lyr in layers])

    def name_axis(v):
        v.set_metadata(logical_axes=("layers",) + tuple(v.get_metadata()["logical_axes"]))
        return v

    return nnx.merge(graphdef, jax.tree.map(name_axis, stacked, is_leaf=is_variable))


class BailingMoeForCausalLM(nnx.Module):
    """Parameters: ``first_layers`` (the ``cfg.num_first_layers`` dense layers of a MoE model, one module each) and
    ``layers`` (every later layer: one DecoderLayer whose parameters carry a leading ``layers`` axis, run as one
    ``lax.scan``).  :meth:`layer` gives any layer as one module by its global index."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.word_embeddings = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        k = cfg.num_first_layers
        # built one by one in layer order, then stacked: the same random draws as one module per layer
        built = [DecoderLayer(cfg, i, rngs) for i in range(cfg.num_hidden_layers)]
        self.first_layers = nnx.List(built[:k])
        self.layers = stack_layers(built[k:])
        self.norm = RMSNorm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

    def head_weight(self) -> jax.Array:
        """[H, V] output projection in the compute dtype, with norm_head applied (each hidden row of the HF
        [V, H] weight's columns divided by its L2 norm over the vocab axis + 1e-7; the norm is not
        differentiated, as in the reference's training branch)."""
        cfg = self.config
        w = self.word_embeddings[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        if cfg.norm_head:
            wf = w.astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(wf * wf, axis=1, keepdims=True)) + 1e-7
            w = wf / jax.lax.stop_gradient(norm)
        return w.astype(dtype_of(cfg.dtype))

    def __call__(
        self,
        tokens,
        positions=None,
        segment_ids=None,
        cache: KVCache | None = None,
        write_idx=None,
        *,
        return_hidden=False,
        compute_logits=True,
        routing: jax.Array | None = None,
        return_routing: bool = False,
    ) -> Output:
        """``routing`` [B, T, num_moe_layers, k] (int; ``-1`` = no record): rollout routing replay, each MoE layer
        sends each token to the recorded experts (``moe.route_replay``); ``return_routing``: the router's own
        top-k per token and MoE layer in ``Output.routing``."""
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = jnp.take(self.word_embeddings[...], tokens, axis=0).astype(dt)

        view = None
        if cache is not None:
            rows = jnp.arange(b)[:, None]
            cols = write_idx[:, None] + jnp.arange(t)[None, :]
            kv_seg = cache.segment_ids.at[rows, cols].set(segment_ids, mode="drop")
            kv_pos = cache.positions.at[rows, cols].set(positions, mode="drop")
            view = CacheView(write_idx, kv_seg, kv_pos)
            seq_len = jnp.max(jnp.where(kv_seg != 0, kv_pos, 0)) + 1
        else:
            seq_len = jnp.max(jnp.where(segment_ids != 0, positions, 0)) + 1
        cos, sin = rope_cos_sin(cfg, positions, seq_len)

        kv = LayerCache(cache.k, cache.v) if cache is not None else None
        remat = cfg.remat and cache is None
        policy = REMAT_POLICIES[cfg.remat_policy]

        def run(graphdef, p, x, kv, i, rep=None):  # one decoder layer from its parameters p (an nnx State)
            return nnx.merge(graphdef, p)(x, cos, sin, segment_ids, positions, kv, view, i, rep)

        if remat:  # the unit of rematerialisation is one layer, under cfg.remat_policy
            run = jax.checkpoint(run, policy=policy, prevent_cse=False, static_argnums=(0,))
        stats: list[RouterStats] = []
        for i, layer in enumerate(self.first_layers):
            x, st, kv = run(*nnx.split(layer), x, kv, i)
            if st is not None:
                stats.append(st)
        if routing is not None:
            n_moe = cfg.num_hidden_layers - cfg.num_first_layers
            if cfg.num_experts is None or stats or routing.shape != (b, t, n_moe, cfg.num_experts_per_tok):
                raise ValueError(
                    f"routing {routing.shape}: a MoE model's replay is [batch, length, moe layers, top-k] = "
                    f"{(b, t, n_moe, cfg.num_experts_per_tok)}"
                )
            routing = jnp.moveaxis(routing, 2, 0)  # [L, B, T, k]: one slice per scanned layer
        x, stack_stats, kv = self._run_stack(run, x, kv, routing)
        h = self.norm(x)

        logits = None
        if compute_logits:
            logits = jnp.einsum("bth,hv->btv", h, self.head_weight(), preferred_element_type=jnp.float32)
        parts = [jax.tree.map(lambda a: a[None], s) for s in stats] + ([stack_stats] if stack_stats else [])
        own = None
        if parts:  # per MoE layer, in layer order
            bal, z, load, dropped, own = (jnp.concatenate(a) for a in zip(*parts))
            bal, z = jnp.mean(bal), jnp.mean(z)
        else:
            bal = z = jnp.zeros((), jnp.float32)
            load = jnp.zeros((0, cfg.num_experts or 0), jnp.float32)
            dropped = jnp.zeros((0,), jnp.int32)
        new_cache = KVCache(kv.k, kv.v, view.kv_segment_ids, view.kv_positions) if cache is not None else None
        if return_routing:
            if own is None:
                raise ValueError("return_routing: the model has no MoE layer")
            own = jnp.moveaxis(own.reshape(own.shape[0], b, t, -1), 0, 2)  # [L, B*T, k] -> [B, T, L, k]
        return Output(
            logits, bal, z, load, dropped, new_cache, h if return_hidden else None, own if return_routing else None
        )

    def _run_stack(self, run, x, kv, routing=None):
        """The stacked layers on ``x``: one ``lax.scan`` over their parameters (``cfg.scan_layers``), else a Python
        loop over the same parameters; ``routing`` [L, B, T, k] (or None): each layer's replayed expert ids.
        Returns (x, RouterStats with a leading layer axis or None, kv)."""
        cfg = self.config
        k = cfg.num_first_layers
        graphdef, params = nnx.split(self.layers)
        if not cfg.scan_layers:
            stats = []
            for j in range(cfg.num_hidden_layers - k):
                rep = None if routing is None else routing[j]
                x, st, kv = run(graphdef, jax.tree.map(lambda a: a[j], params), x, kv, k + j, rep)  # noqa: B023 (called in this iteration)
                stats.append(st)
            return x, (jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats[0] is not None else None), kv

        def body(carry, xs):
            x, kv = carry
            p, i, rep = xs
            x, st, kv = run(graphdef, p, x, kv, i, rep)
            return (x, kv), st

        (x, kv), stats = jax.lax.scan(body, (x, kv), (params, jnp.arange(k, cfg.num_hidden_layers), routing))
        return x, stats, kv

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` (global index) as one module: a first layer itself, else a DecoderLayer over the
        stack's slice ``i - num_first_layers`` (each stacked array sliced on device; concrete models only)."""
        cfg = self.config
        k = cfg.num_first_layers
        if not 0 <= i < cfg.num_hidden_layers:
            raise IndexError(f"layer {i} of {cfg.num_hidden_layers}")
        if i < k:
            return self.first_layers[i]
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i - k], state))


def build_model(cfg: ModelConfig, seed: int = 0) -> BailingMoeForCausalLM:
    return BailingMoeForCausalLM(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> BailingMoeForCausalLM:
    """The model with abstract (ShapeDtypeStruct) parameters, nothing allocated (``nnx.eval_shape``)."""
    return nnx.eval_shape(lambda: build_model(cfg))
