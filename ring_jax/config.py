"""Model configuration: field names and values of the Hugging Face BailingMoe ``config.json``.

``ModelConfig`` mirrors the published ``config.json`` of inclusionAI/Ling-lite-1.5 (the base of Ring-lite) field for
field, so a ``config.json`` read with :meth:`ModelConfig.from_hf_dict` and written with :meth:`ModelConfig.to_hf_dict`
round-trips unchanged (fields ring_jax does not use are carried in ``extra``).

A few fields are ring_jax run-time knobs, not part of ``config.json`` (``RUNTIME_FIELDS``): how the MoE block is
computed, the compute dtype, rematerialisation.  They never reach ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

# Fields of config.json that ring_jax interprets.  Order = the order they are written.
HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "use_qkv_bias",
    "use_bias",
    "rms_norm_eps",
    "norm_head",
    "tie_word_embeddings",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling",
    "num_experts",
    "num_shared_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "moe_intermediate_size",
    "first_k_dense_replace",
    "pad_token_id",
    "eos_token_id",
    "bos_token_id",
    "initializer_range",
    "use_sliding_window",
)

# Defaults of the upstream ``BailingMoeConfig.__init__`` (configuration_bailing_moe.py): what transformers uses for
# a field a config.json leaves out.  They differ from the published Ling-lite-1.5 values below.
UPSTREAM_CLASS_DEFAULTS = dict(
    vocab_size=30592,
    hidden_size=1024,
    intermediate_size=None,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=0,
    head_dim=None,
    hidden_act="silu",
    use_qkv_bias=False,
    use_bias=True,
    rms_norm_eps=1e-5,
    norm_head=False,
    tie_word_embeddings=False,
    max_position_embeddings=16384,
    rope_theta=10000.0,
    rope_scaling=None,
    num_experts=16,
    num_shared_experts=0,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    moe_intermediate_size=None,
    first_k_dense_replace=0,
    pad_token_id=126081,
    eos_token_id=None,
    bos_token_id=None,
    initializer_range=0.02,
    use_sliding_window=False,
)

MOE_IMPLS = ("dispatch", "ragged", "dense", "capacity", "pallas")
# what a rematerialised decoder layer keeps for the backward pass (ring_jax.model.transformer.REMAT_POLICIES):
# nothing (the whole layer is recomputed), dots (every matmul output), dots_no_batch (matmuls without batch dims)
REMAT_POLICIES = ("nothing", "dots", "dots_no_batch")
# attention over the KV cache: blocked (an XLA loop over the blocks up to the longest row's live length), pallas
# (ring_kernels.decode_attention for one-token decode: each row's own live blocks; GPU), full (every cache slot), auto
# (pallas on GPU, else blocked)
CACHE_ATTN = ("auto", "blocked", "pallas", "full")
RUNTIME_FIELDS = (
    "moe_impl",
    "dtype",
    "param_dtype",
    "remat",
    "remat_policy",
    "scan_layers",
    "moe_tile",
    "moe_capacity_factor",
    "attn_chunk",
    "moe_chunk",
    "cache_attn",
    "cache_block",
    "ep_platform",
    "ep_auto_ragged",
)


class ConfigError(ValueError):
    """A config field has a value ring_jax cannot honour."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # --- config.json fields; defaults are the published Ling-lite-1.5 config.json ---
    vocab_size: int = 126464
    hidden_size: int = 2048
    intermediate_size: int | None = 5632
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = 128
    hidden_act: str = "silu"
    use_qkv_bias: bool = False
    use_bias: bool = False
    rms_norm_eps: float = 1e-6
    norm_head: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    num_experts: int | None = 64
    num_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    norm_topk_prob: bool = True
    moe_intermediate_size: int | None = 1408
    first_k_dense_replace: int = 0
    pad_token_id: int | None = 126081
    eos_token_id: int | list | None = 126081
    bos_token_id: int | None = None
    initializer_range: float = 0.006
    use_sliding_window: bool = False
    # --- config.json fields ring_jax carries but does not interpret (dropouts, torch_dtype, ...) ---
    extra: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)
    # --- ring_jax run-time knobs (never written to config.json) ---
    moe_impl: str = (
        "dispatch"  # dispatch (sort + tiled grouped matmul), ragged (lax.ragged_dot), dense (oracle), pallas
    )
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (master weights)
    remat: bool = False  # rematerialise each decoder layer in the backward pass
    remat_policy: str = "nothing"  # what a rematerialised layer saves (REMAT_POLICIES)
    # the layers after the first_k_dense_replace ones share one shape and run as one lax.scan over their stacked
    # parameters (compile time independent of depth); False: a Python loop over the same stacked parameters
    # (same layout, same checkpoints; compiles every layer)
    scan_layers: bool = True
    moe_tile: int = 0  # full row tile of the dispatch path's grouped loop (0 = automatic: grouped_xla.auto_full_tile)
    # expert-parallel capacity factor: None = dropless (capacity = local tokens); c > 0 keeps at most
    # ceil(c * local_tokens * k / num_experts) tokens per expert per device and drops (counts) the rest
    moe_capacity_factor: float | None = None
    # the expert-parallel dispatch (ring_jax.model.moe_ep.choose_impl): the platform it decides for (None: jax's
    # default backend; ring-jax-fit sets "tpu" when it compiles for a TPU topology from a CPU host) and whether it
    # may pick the ragged all_to_all path there (False: the capacity all_to_all path)
    ep_platform: str | None = None
    ep_auto_ragged: bool = True
    # long sequences: attention ``attn_chunk`` queries at a time (0 = all at once; same numerics, scores memory
    # [B, H, attn_chunk, S] instead of [B, H, T, S]) and the routed experts ``moe_chunk`` positions of every row at a
    # time (0 = all; bounds the dispatch buffers); both rematerialised per chunk in the backward pass
    attn_chunk: int = 0
    moe_chunk: int = 0
    # attention over the KV cache (CACHE_ATTN) and its block of cache slots: decode and prefill read only the blocks
    # that hold live keys, so their cost follows the live length, not the cache bucket
    cache_attn: str = "auto"
    cache_block: int = 256

    def __post_init__(self):
        self.validate()

    def __hash__(self):  # rope_scaling is a dict: hash a canonical JSON form (jit needs hashable static config)
        return hash(
            json.dumps(
                {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.hash is not False},
                sort_keys=True,
                default=str,
            )
        )

    # ------------------------------------------------------------------ derived sizes
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, (list, tuple)):
            return tuple(int(i) for i in self.eos_token_id)
        return (int(self.eos_token_id),)

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts is not None and i >= self.first_k_dense_replace

    @property
    def num_first_layers(self) -> int:
        """Decoder layers before the stacked (scanned) ones: the first_k_dense_replace dense layers of a MoE model
        (every later layer is MoE); 0 when every layer has one shape (a dense model, or no dense layer)."""
        k = self.first_k_dense_replace
        return k if self.num_experts is not None and 0 < k < self.num_hidden_layers else 0

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def bad(field, why):
            raise ConfigError(f"config field {field}={getattr(self, field)!r}: {why}")

        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' (SwiGLU) is implemented, as in every published BailingMoe checkpoint")
        if self.use_sliding_window:
            bad("use_sliding_window", "sliding-window attention is not implemented (the upstream code ignores it too)")
        if not self.num_key_value_heads or self.num_key_value_heads < 1:
            bad(
                "num_key_value_heads",
                "must be >= 1 (the upstream code divides by it; MHA sets it to num_attention_heads)",
            )
        if self.num_attention_heads % self.kv_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad("hidden_size", "must be divisible by num_attention_heads when head_dim is not set")
        if self.head_size % 2:
            bad("head_dim", "rotary embeddings need an even head size")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("linear", "dynamic"):
                bad("rope_scaling", "the reference implements only 'linear' and 'dynamic' rope scaling")
            if "factor" not in self.rope_scaling:
                bad("rope_scaling", "needs a 'factor'")
        if self.num_experts is not None:
            if self.moe_intermediate_size is None:
                bad("moe_intermediate_size", "required when num_experts is set")
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                bad("num_experts_per_tok", f"must be in [1, num_experts={self.num_experts}]")
        if self.first_k_dense_replace > 0 or self.num_experts is None:
            if self.intermediate_size is None:
                bad("intermediate_size", "required for dense MLP layers (first_k_dense_replace > 0)")
        if self.moe_impl not in MOE_IMPLS:
            bad("moe_impl", f"one of {MOE_IMPLS}")
        if self.cache_attn not in CACHE_ATTN:
            bad("cache_attn", f"one of {CACHE_ATTN}")
        if self.cache_block < 1 or self.cache_block & (self.cache_block - 1):
            bad("cache_block", "a power of two")
        if self.remat_policy not in REMAT_POLICIES:
            bad("remat_policy", f"one of {REMAT_POLICIES}")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            bad("moe_capacity_factor", "None (dropless) or > 0")
        for f in ("attn_chunk", "moe_chunk"):
            if getattr(self, f) < 0:
                bad(f, "0 (off) or a positive number of positions")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in ("float32", "bfloat16"):
                bad(f, "float32 or bfloat16")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime: Any) -> ModelConfig:
        """Build from a parsed config.json.  Missing fields take the upstream class defaults, as transformers does."""
        mt = d.get("model_type", "bailing_moe")
        if mt != "bailing_moe":
            raise ConfigError(f"config field model_type={mt!r}: ring_jax loads only 'bailing_moe'")
        known = {k: d.get(k, UPSTREAM_CLASS_DEFAULTS[k]) for k in HF_FIELDS}
        extra = {k: v for k, v in d.items() if k not in HF_FIELDS}
        for k in runtime:
            if k not in RUNTIME_FIELDS:
                raise ConfigError(f"unknown run-time option {k!r}; known: {RUNTIME_FIELDS}")
        return cls(**known, extra=extra, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for k in HF_FIELDS:
            out[k] = getattr(self, k)
        out.setdefault("model_type", "bailing_moe")
        out.setdefault("architectures", ["BailingMoeForCausalLM"])
        out.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_bailing_moe.BailingMoeConfig",
                "AutoModel": "modeling_bailing_moe.BailingMoeModel",
                "AutoModelForCausalLM": "modeling_bailing_moe.BailingMoeForCausalLM",
            },
        )
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str], **runtime: Any) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), **runtime)

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    # ------------------------------------------------------------------ parameter counting
    def param_counts(self) -> dict[str, int]:
        """Exact total and activated parameter counts (activated: top-k routed experts, shared, dense, attention,
        embeddings and head), from the shapes alone."""
        h, hd = self.hidden_size, self.head_size
        qkv = h * (self.num_attention_heads + 2 * self.kv_heads) * hd + (
            (self.num_attention_heads + 2 * self.kv_heads) * hd if self.use_qkv_bias else 0
        )
        dense_out = self.num_attention_heads * hd * h + (h if self.use_bias else 0)
        attn = qkv + dense_out + 2 * h  # + the two RMSNorm weights
        total = active = 0
        for i in range(self.num_hidden_layers):
            total += attn
            active += attn
            if self.is_moe_layer(i):
                expert = 3 * h * self.moe_intermediate_size
                shared = 3 * h * self.moe_intermediate_size * (self.num_shared_experts or 0)
                router = self.num_experts * h
                total += self.num_experts * expert + shared + router
                active += self.num_experts_per_tok * expert + shared + router
            else:
                total += 3 * h * self.intermediate_size
                active += 3 * h * self.intermediate_size
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total += emb + head + h
        active += emb + head + h
        return {"total": total, "active": active}


PRESETS: dict[str, ModelConfig] = {
    "ling-lite-1.5": ModelConfig(dtype="bfloat16", param_dtype="float32"),
    # Test-sized: every code path (GQA, a dense first layer, shared expert) with a few thousand parameters.
    "tiny": ModelConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        rope_theta=10000.0,
        num_experts=4,
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        pad_token_id=0,
        eos_token_id=1,
        initializer_range=0.02,
    ),
    # ~22M total / ~5M active: learns procedural tasks on 2 CPU cores in minutes.
    "small": ModelConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        num_experts=16,
        num_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        first_k_dense_replace=0,
        pad_token_id=0,
        eos_token_id=1,
        initializer_range=0.02,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{max(0, 3 - int(math.log10(abs(n) / div)) - 1)}f}{unit}"
    return str(n)
