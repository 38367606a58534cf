"""Pallas MoE kernels (interpret mode on CPU; written for Triton on GPU and Mosaic on TPU).

routing.py  topk_route, expert_metadata (+ RoutingMeta, *_ref)
gmm.py      gmm (custom_vjp), tgmm, GmmTiling, make_schedule (+ gmm_ref, tgmm_ref)
combine.py  permute, unpermute_combine (custom_vjps) (+ *_ref)
ops.py      moe_ffn (+ moe_ffn_ref)
"""

from ring_kernels.combine import permute, permute_ref, unpermute_combine, unpermute_combine_ref
from ring_kernels.gmm import GmmTiling, gmm, gmm_ref, make_schedule, tgmm, tgmm_ref
from ring_kernels.ops import moe_ffn, moe_ffn_ref
from ring_kernels.routing import RoutingMeta, expert_metadata, expert_metadata_ref, topk_route, topk_route_ref

__all__ = [
    "GmmTiling",
    "RoutingMeta",
    "expert_metadata",
    "expert_metadata_ref",
    "gmm",
    "gmm_ref",
    "make_schedule",
    "moe_ffn",
    "moe_ffn_ref",
    "permute",
    "permute_ref",
    "tgmm",
    "tgmm_ref",
    "topk_route",
    "topk_route_ref",
    "unpermute_combine",
    "unpermute_combine_ref",
]
