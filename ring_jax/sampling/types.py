"""Data types of the sampling engine: per-request sampling parameters, finished completions, the device-side decode
state carried between jitted calls, and the shape-bucket helpers."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np

from ring_jax.model.transformer import KVCache

FINISH_STOP = "stop"  # a stop token was sampled (it is included in the output)
FINISH_LENGTH = "length"  # max_new_tokens (or the cache length) was reached


class SamplingError(ValueError):
    """A request the engine cannot serve (empty prompt, prompt longer than the context, bad parameter)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one prompt is sampled.  ``temperature`` 0 = greedy (argmax of the raw logits).  Filters apply in the
    Hugging Face order: temperature, then top-k (0 = off), then top-p (1.0 = off) on the top-k renormalised mass.
    Stop tokens: the config's ``eos_ids`` (unless ``ignore_eos``) plus ``stop_token_ids``."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    n: int = 1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise SamplingError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.n < 1:
            raise SamplingError(f"n={self.n}: must be >= 1")

    @property
    def filtered(self) -> bool:
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1.0)


@dataclasses.dataclass
class Completion:
    """One generated sequence.  ``logprobs``: log-probability of each sampled token under the distribution it was
    actually drawn from (after temperature/top-k/top-p; 0.0 for greedy rows, a point mass).  ``raw_logprobs``:
    log_softmax of the unmodified logits at temperature 1 (the policy's own log-probability, what RL needs as the
    old-policy logprob)."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: np.ndarray  # [G] int32, including the stop token when finish_reason == "stop"
    logprobs: np.ndarray  # [G] float32
    raw_logprobs: np.ndarray  # [G] float32
    finish_reason: str
    # [prompt + G, MoE layers, k] experts each token was routed to (SamplingEngine(record_routing=True)); -1 where
    # none was recorded (the last response token, never fed back)
    routing: np.ndarray | None = None


class DecodeState(NamedTuple):
    """Everything the decode loop carries, one row per slot.  ``logits`` are the next-token logits of each row (from
    prefill or from the previous step); ``pos`` is where the next token goes (cache slot == position: prompts are
    left-aligned, so slot i of a row holds position i)."""

    cache: KVCache  # [B, S, ...]
    logits: jax.Array  # [B, V] float32
    keys: jax.Array  # [B, 2] uint32 raw threefry key data of each sequence
    pos: jax.Array  # [B] int32
    ngen: jax.Array  # [B] int32 tokens generated so far
    max_new: jax.Array  # [B] int32
    active: jax.Array  # [B] bool
    stop_hit: jax.Array  # [B] bool: finished on a stop token
    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    stop_ids: jax.Array  # [B, NS] int32, padded with -1


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    b = 1
    while b < max(n, minimum):
        b *= 2
    return b
