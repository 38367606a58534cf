"""What the RL step needs from a sampler: :class:`Rollout`, ``generate(params, prompts, sampling, key)`` ->
completions with the per-token log-probabilities of the policy that sampled them.  :class:`EngineRollout` is the
library's own (the sampling engine on the trainer's live parameters); a test or another backend can pass any object
with that method to ``RLStep(rollout=...)``.
"""

from __future__ import annotations

from typing import Any, Protocol

from flax import nnx

from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import Completion, SamplingParams


class Rollout(Protocol):
    """Samples responses from the policy with parameters ``params``."""

    def generate(
        self, params: nnx.State | dict[str, Any], prompts: list[list[int]], sampling: SamplingParams, key: int
    ) -> list[Completion]:
        """``sampling.n`` completions per prompt (token ids), ordered by (prompt, sample), each with the raw
        log-probabilities of its tokens under ``params`` (pi_old); ``key`` seeds the draws."""
        ...


class EngineRollout:
    """A :class:`Rollout` by :class:`SamplingEngine`: an engine over ``params`` (used as they are, no copy) per call;
    engines over one graphdef share their compilations, so only the first call compiles.  ``dtype``: the sampler's
    compute dtype (None: the model's); ``record_routing`` (None: for a MoE model): completions carry the experts
    each token was routed to (routing replay, mismatch metrics)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        *,
        num_slots: int = 16,
        moe_impl: str | None = None,
        dtype: str | None = None,
        record_routing: bool | None = None,
    ):
        self.graphdef, self.num_slots, self.moe_impl = graphdef, num_slots, moe_impl
        self.dtype, self.record_routing = dtype, record_routing

    def generate(
        self, params: nnx.State | dict[str, Any], prompts: list[list[int]], sampling: SamplingParams, key: int
    ) -> list[Completion]:
        engine = SamplingEngine(
            self.graphdef,
            params,
            num_slots=self.num_slots,
            moe_impl=self.moe_impl,
            dtype=self.dtype,
            record_routing=self.record_routing,
        )
        return engine.generate(prompts, sampling, key=key)
