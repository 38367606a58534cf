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


class KVCache(NamedTuple):
    layers: tuple  # one LayerCache per decoder layer
    segment_ids: jax.Array  # [B, S] 0 = empty slot
    positions: jax.Array  # [B, S]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dt = dtype_of(dtype or cfg.dtype)
    k_shape = (batch, cfg.kv_heads, cfg.head_size, max_len)  # attention.K_CACHE_AXES
    v_shape = (batch, cfg.kv_heads, max_len, cfg.head_size)  # attention.CACHE_AXES
    layers = tuple(LayerCache(jnp.zeros(k_shape, dt), jnp.zeros(v_shape, dt)) for _ in range(cfg.num_hidden_layers))
    return KVCache(layers, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((batch, max_len), jnp.int32))


class Output(NamedTuple):
    logits: jax.Array  # [B, T, V] float32 (None when skipped)
    balance_loss: jax.Array  # mean over MoE layers of E * sum_i P_i F_i
    z_loss: jax.Array  # mean over MoE layers of the router z-loss
    expert_load: jax.Array  # [num_moe_layers, E] assignments per expert
    cache: KVCache | None
    hidden: jax.Array | None  # final normed hidden states [B, T, H] when asked for


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, idx: int, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg, rngs)
        self.attention = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg, rngs)
        self.is_moe = cfg.is_moe_layer(idx)
        self.mlp = MoEBlock(cfg, rngs) if self.is_moe else SwiGLU(cfg, cfg.intermediate_size, rngs)

    def __call__(self, x, cos, sin, segment_ids, positions, cache=None, view=None):
        a, new_cache = self.attention(self.input_layernorm(x), cos, sin, segment_ids, positions, cache, view)
        x = x + a
        hn = self.post_attention_layernorm(x)
        if self.is_moe:
            m, stats = self.mlp(hn, segment_ids != 0)
        else:
            m, stats = self.mlp(hn), None
        return x + m, stats, new_cache


class BailingMoeForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.word_embeddings = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

    def head_weight(self):
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

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 write_idx=None, *, return_hidden=False, compute_logits=True) -> Output:
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

        stats: list[RouterStats] = []
        new_layers = []
        for i, layer in enumerate(self.layers):
            lc = cache.layers[i] if cache is not None else None
            if cfg.remat and cache is None:
                x, st, nc = nnx.remat(lambda lyr, *a: lyr(*a))(layer, x, cos, sin, segment_ids, positions)
            else:
                x, st, nc = layer(x, cos, sin, segment_ids, positions, lc, view)
            if st is not None:
                stats.append(st)
            new_layers.append(nc)
        h = self.norm(x)

        logits = None
        if compute_logits:
            logits = jnp.einsum("bth,hv->btv", h, self.head_weight(), preferred_element_type=jnp.float32)
        if stats:
            bal = jnp.mean(jnp.stack([s.balance_loss for s in stats]))
            z = jnp.mean(jnp.stack([s.z_loss for s in stats]))
            load = jnp.stack([s.expert_load for s in stats])
        else:
            bal = z = jnp.zeros((), jnp.float32)
            load = jnp.zeros((0, cfg.num_experts or 0), jnp.float32)
        new_cache = KVCache(tuple(new_layers), view.kv_segment_ids, view.kv_positions) if cache is not None else None
        return Output(logits, bal, z, load, new_cache, h if return_hidden else None)


def build_model(cfg: ModelConfig, seed: int = 0) -> BailingMoeForCausalLM:
    return BailingMoeForCausalLM(cfg, nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig):
    """The model with abstract (ShapeDtypeStruct) parameters, nothing allocated (``nnx.eval_shape``)."""
    return nnx.eval_shape(lambda: build_model(cfg))
