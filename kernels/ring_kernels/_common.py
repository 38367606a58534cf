"""Small helpers shared by the Pallas kernels: backend detection, padding, specs for scalar tables, dot precision.

Portability rules followed by every kernel in this package (so one kernel body serves interpret / Triton / Mosaic):
- every array that is *loaded* or *stored* in a kernel has a power-of-two number of elements (Triton requirement);
  wrappers pad arrays to tile multiples instead of relying on masked out-of-bounds loads;
- data-dependent addressing is done with scalar loads from small int32 tables (``ref[i]``) and ``pl.ds`` slices of
  whole-array refs, never with scalar-prefetch index maps (Triton has no scalar prefetch) or scratch buffers;
- no cross-program communication: each grid program owns its output block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

if TYPE_CHECKING:
    from jax.experimental.pallas import triton as plt

_TARGET: str | None = None


def backend() -> str:
    """The platform the kernels are built for: jax's default backend, unless inside ``lowering_target``."""
    return _TARGET or jax.default_backend()


@contextlib.contextmanager
def lowering_target(platform: str) -> Iterator[None]:
    """Build the kernels for ``platform`` ('gpu' or 'tpu', compiled, not interpreted) while tracing on this host,
    e.g. ``with lowering_target('gpu'): jax.jit(f).trace(x).lower(lowering_platforms=('cuda',))`` -- checks the
    Pallas -> Triton / Mosaic lowering without the hardware (the backend compiler itself is not run)."""
    global _TARGET
    prev, _TARGET = _TARGET, platform
    try:
        yield
    finally:
        _TARGET = prev


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret exactly when there is no accelerator (CPU)."""
    if interpret is None:
        return backend() == "cpu"
    return bool(interpret)


def compiler_params(interpret: bool) -> plt.CompilerParams | None:
    """On GPU force the Triton lowering (jax may default to Mosaic GPU, which these kernels are not written for)."""
    if interpret or backend() != "gpu":
        return None
    from jax.experimental.pallas import triton as plt

    return plt.CompilerParams(num_warps=4, num_stages=2)


def scalar_spec(
    interpret: bool, block_shape: Sequence[int] | None = None, index_map: Callable[..., Any] | None = None
) -> pl.BlockSpec:
    """BlockSpec for a small int32/f32 table read with scalar loads: SMEM on TPU, default memory elsewhere (Triton:
    a global pointer).  Without a block shape it is the whole table."""
    if not interpret and backend() == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(block_shape, index_map, memory_space=pltpu.SMEM)
    return pl.BlockSpec(block_shape, index_map)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def pad_to(x: jax.Array, shape: Sequence[int], value: float = 0) -> jax.Array:
    pads = [(0, s - d) for d, s in zip(x.shape, shape)]
    if all(p == (0, 0) for p in pads):
        return x
    return jnp.pad(x, pads, constant_values=value)


def fit_tile(t: int, dim: int, lo: int = 8) -> int:
    """Clamp a power-of-two tile to the problem: no larger than next_pow2(dim), no smaller than ``lo``."""
    if t <= 0 or t & (t - 1):
        raise ValueError(f"tile sizes must be powers of two, got {t}")
    return max(lo, min(t, next_pow2(max(dim, 1))))


def dot_precision() -> lax.Precision | None:
    """Precision for in-kernel dots, following ``jax_default_matmul_precision`` at trace time.

    In interpret mode XLA applies the config anyway; on Triton an unset precision means TF32 for float32 inputs, so
    'highest'/'float32' is passed explicitly to get IEEE float32 there too.
    """
    p = jax.config.jax_default_matmul_precision
    if p is None:
        return None
    p = str(p).lower()
    if p in ("highest", "float32", "f32_f32_f32"):
        return lax.Precision.HIGHEST
    if p in ("high", "tensorfloat32", "bfloat16_3x"):
        return lax.Precision.HIGH
    return None
