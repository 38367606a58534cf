"""Portability guard: every kernel (forward and backward) lowers for real GPU (Pallas -> Triton IR) and TPU
(Pallas -> Mosaic MLIR) from this CPU host.  This runs the Pallas lowering only -- the Triton/PTX and Mosaic
backend compilers (register limits, VMEM sizes, layout legality) need the hardware and are not exercised here."""

import re

import jax
import jax.numpy as jnp
import pytest

from ring_kernels._common import lowering_target
from ring_kernels.ops import moe_ffn
from ring_kernels.routing import topk_route


@pytest.mark.parametrize(
    "platform,lowering_platform,marker",
    [("gpu", "cuda", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")],
)
def test_kernels_lower_for_accelerators(platform, lowering_platform, marker):
    t, h, f, e, k = 32, 256, 128, 8, 2
    tiling = (128, 128, 128) if platform == "tpu" else (16, 32, 32)
    x = jnp.ones((t, h))
    ids = jnp.zeros((t, k), jnp.int32)
    w = jnp.ones((t, k))
    wg = jnp.ones((e, h, f))
    wd = jnp.ones((e, f, h))
    logits = jnp.ones((t, e))

    def moe_grads(*a):
        return jax.grad(lambda *a: jnp.sum(moe_ffn(a[0], ids, *a[1:], tiling=tiling)), argnums=(0, 1, 2, 3, 4))(*a)

    def router_grad(l):
        return jax.grad(lambda l: jnp.sum(topk_route(l, k, True)[0] * jnp.arange(k)))(l)

    with lowering_target(platform):
        texts = [
            jax.jit(moe_grads).trace(x, w, wg, wg, wd).lower(lowering_platforms=(lowering_platform,)).as_text(),
            jax.jit(router_grad).trace(logits).lower(lowering_platforms=(lowering_platform,)).as_text(),
        ]
    # moe_ffn fwd+bwd: 2 metadata + permute + 3 gmm + combine, then combine-bwd (gather + rowdot),
    # 3 x (gmm d_lhs + tgmm), permute-bwd; the router: 1
    n = sum(len(re.findall(re.escape(marker), s)) for s in texts)
    assert n >= 15, n
