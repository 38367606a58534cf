"""Small building blocks of the BailingMoe network: parameters with logical axes, RMSNorm, RoPE, SwiGLU MLP.

Every parameter carries ``logical_axes`` metadata (one name per dimension); ``ring_jax.sharding`` maps those names
to mesh axes with a single rules table.  Parameters are stored in ``param_dtype`` and cast to the compute ``dtype`` at
use, so float32 master weights with bfloat16 compute is a config switch.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from ring_jax.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(
    rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], cfg: ModelConfig, init: str = "normal"
) -> nnx.Param:
    """A parameter of ``shape`` whose dimensions are named ``axes`` (logical axis names)."""
    assert len(shape) == len(axes), (shape, axes)
    pdt = dtype_of(cfg.param_dtype)
    if init == "normal":
        value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value.astype(pdt), logical_axes=tuple(axes))


class RMSNorm(nnx.Module):
    """``weight * (x_f32 * rsqrt(mean(x_f32^2) + eps)).astype(x.dtype)``, exactly the reference's order."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.weight = param(rngs, (cfg.hidden_size,), ("norm",), cfg, init="ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


# ---------------------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(cfg: ModelConfig, seq_len: int | jax.Array | None = None) -> jax.Array:
    """Inverse frequencies (float32).  ``dynamic`` scaling rescales the base once ``seq_len`` (traced or static)
    exceeds max_position_embeddings, as the reference's DynamicNTK embedding does."""
    d = cfg.head_size
    exponent = jnp.arange(0, d, 2, dtype=jnp.float32) / d
    base = jnp.float32(cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is not None and rs.get("type", rs.get("rope_type")) == "dynamic" and seq_len is not None:
        f, mpe = float(rs["factor"]), cfg.max_position_embeddings
        seq_len = jnp.asarray(seq_len, jnp.float32)
        scaled = base * ((f * seq_len / mpe) - (f - 1)) ** (d / (d - 2))
        base = jnp.where(seq_len > mpe, scaled, base)
    return 1.0 / (base**exponent)


def rope_cos_sin(
    cfg: ModelConfig, positions: jax.Array, seq_len: int | jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] for integer ``positions`` (rotate-half layout: the two halves repeat)."""
    t = positions.astype(jnp.float32)
    rs = cfg.rope_scaling
    if rs is not None and rs.get("type", rs.get("rope_type")) == "linear":
        t = t / jnp.float32(rs["factor"])
    freqs = t[..., None] * rope_inv_freq(cfg, seq_len)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rope(x, cos, sin):
    return x * cos + _rotate_half(x) * sin


@jax.custom_vjp
def _rope_vjp(x, cos, sin):
    return _rope(x, cos, sin)


def _rope_fwd(x, cos, sin):
    return _rope(x, cos, sin), (cos, sin)


def _rope_bwd(res, dy):
    # rotate_half's transpose is concat(z[half:], -z[:half]): written as one concatenate here, the backward is a
    # single elementwise pass (autodiff of the forward's slices + concatenate gave pads and adds)
    cos, sin = res
    z = dy * sin
    half = z.shape[-1] // 2
    return dy * cos + jnp.concatenate([z[..., half:], -z[..., :half]], axis=-1), None, None


_rope_vjp.defvjp(_rope_fwd, _rope_bwd)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, D]; cos/sin [B, T, D] (float32, cast to x's dtype as the reference does).  cos/sin get no
    gradient (they are functions of the integer positions)."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return _rope_vjp(x, cos, sin)


# ---------------------------------------------------------------------------------------------------------- MLP
class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``: the dense MLP (width intermediate_size) and the shared experts
    (width moe_intermediate_size * num_shared_experts, one fused MLP as in the reference)."""

    def __init__(self, cfg: ModelConfig, width: int, rngs: nnx.Rngs, axis: str = "mlp"):
        h = cfg.hidden_size
        self.gate_proj = param(rngs, (h, width), ("embed", axis), cfg)
        self.up_proj = param(rngs, (h, width), ("embed", axis), cfg)
        self.down_proj = param(rngs, (width, h), (axis, "embed"), cfg)
        self.dtype = dtype_of(cfg.dtype)

    def __call__(self, x):
        dt = self.dtype
        g = x @ self.gate_proj[...].astype(dt)
        u = x @ self.up_proj[...].astype(dt)
        return (jax.nn.silu(g) * u) @ self.down_proj[...].astype(dt)
