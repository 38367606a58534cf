"""The BailingMoe network (Flax NNX)."""

from ring_jax.model.transformer import BailingMoeForCausalLM, KVCache, Output, abstract_model, build_model, init_cache

__all__ = ["BailingMoeForCausalLM", "KVCache", "Output", "abstract_model", "build_model", "init_cache"]
