"""JAX sampling engine: KV-cached prefill/decode, greedy / temperature / top-k / top-p sampling with explicit PRNG
keys, stop tokens, n samples per prompt sharing one prefill, continuous batching, per-token logprobs (sampling
distribution and raw policy).

Layout: ``device`` (the jitted prefill / insert / decode functions, the decode state's placement and the shape
buckets), ``engine`` (:class:`SamplingEngine`: request checks and the continuous / static batching loop over those
functions), ``rules`` (top-k / top-p / temperature sampling of a batch of logits), ``types`` (parameters,
completions, the decode state)."""

from ring_jax.sampling.device import decode_step
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.rules import filter_logits, sample_tokens, sampling_logprobs, top_k_mask, top_p_mask
from ring_jax.sampling.types import (
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    DecodeState,
    SamplingError,
    SamplingParams,
    pow2_bucket,
)

__all__ = [
    "Completion",
    "DecodeState",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "SamplingEngine",
    "SamplingError",
    "SamplingParams",
    "decode_step",
    "filter_logits",
    "pow2_bucket",
    "sample_tokens",
    "sampling_logprobs",
    "top_k_mask",
    "top_p_mask",
]
