"""How much a policy still explores: the entropy of its next-token distribution on its own rollouts.

Ring-lite chooses the SFT checkpoint that RL starts from by this entropy (a band, 0.3-0.5 nats at 16.8B) rather
than by validation accuracy: a checkpoint trained until its distribution has collapsed leaves RL nothing to explore.
``rollout_entropy`` samples ``n`` responses per prompt at temperature 1 without top-p (the policy itself), then
scores them teacher-forced and averages H(pi(. | prefix)) over every response token -- the same per-token entropy the
RL step logs as ``entropy``.  ``sampled_nll`` (the mean of -log pi of the sampled tokens) is a Monte-Carlo estimate
of the same quantity from the sampler alone; the two agreeing is a check on both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from ring_jax.rl.batch import build_rows
from ring_jax.rl.step import policy_logprobs
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import Completion, SamplingParams


@dataclasses.dataclass(frozen=True)
class EntropyProbe:
    entropy: float  # mean over response tokens of the exact entropy of pi(. | prefix), nats
    sampled_nll: float  # mean over response tokens of -log pi(sampled token): an estimate of the same
    tokens: int  # response tokens scored
    responses: int
    mean_length: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_entropy_fn(graphdef: nnx.GraphDef) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Jitted ``(params, rows..., weights) -> (sum of weights * entropy, sum of weights)``."""

    @jax.jit
    def fn(params, tokens, positions, segment_ids, targets, weights):
        model = nnx.merge(graphdef, params)
        _, ent, _ = policy_logprobs(model, tokens, positions, segment_ids, targets)
        return (ent * weights).sum(), weights.sum()

    return fn


def completion_entropy(
    graphdef: nnx.GraphDef,
    params: nnx.State | dict[str, Any],
    comps: Sequence[Completion],
    *,
    seq_len: int = 256,
    rows_per_call: int = 16,
    entropy_fn: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
) -> EntropyProbe:
    """Mean per-token entropy of ``params``' next-token distribution over the responses of ``comps`` (engine
    Completions), scored teacher-forced in packed ``seq_len``-token rows, ``rows_per_call`` rows per jitted call
    (one compiled shape).  ``entropy_fn`` (``make_entropy_fn(graphdef)``) reuses a compilation across checkpoints."""
    comps = [c for c in comps if len(c.token_ids)]
    if not comps:
        raise ValueError("completion_entropy: every response was empty")
    keep = [len(c.token_ids) for c in comps]
    rows, _ = build_rows(
        [c.prompt_ids for c in comps],
        [c.token_ids for c in comps],
        [c.raw_logprobs for c in comps],
        np.zeros(len(comps), np.float32),
        keep,
        np.ones(len(comps), np.float32),
        seq_len,
        row_multiple=rows_per_call,
        pow2_rows=False,
    )
    fn = entropy_fn or make_entropy_fn(graphdef)
    total = count = 0.0
    for i in range(0, len(rows["tokens"]), rows_per_call):
        sl = {k: rows[k][i : i + rows_per_call] for k in ("tokens", "positions", "segment_ids", "targets", "weights")}
        s, c = fn(params, sl["tokens"], sl["positions"], sl["segment_ids"], sl["targets"], sl["weights"])
        total, count = total + float(s), count + float(c)
    nll = -float(np.mean(np.concatenate([np.asarray(c.raw_logprobs, np.float64) for c in comps])))
    return EntropyProbe(
        entropy=total / count,
        sampled_nll=nll,
        tokens=int(count),
        responses=len(comps),
        mean_length=float(np.mean(keep)),
    )


def sample_for_entropy(
    graphdef: nnx.GraphDef,
    params: nnx.State | dict[str, Any],
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 4,
    max_new_tokens: int = 64,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    num_slots: int = 64,
    moe_impl: str | None = None,
) -> list[Completion]:
    """``n`` responses per prompt from the policy itself: temperature 1, no top-p."""
    if not prompts:
        raise ValueError("sample_for_entropy: no prompts")
    engine = SamplingEngine(graphdef, params, num_slots=num_slots, moe_impl=moe_impl)
    sp = SamplingParams(
        temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, n=n, stop_token_ids=tuple(int(s) for s in stop_ids)
    )
    return engine.generate([list(map(int, p)) for p in prompts], sp, key=seed)


def rollout_entropy(
    graphdef: nnx.GraphDef,
    params: nnx.State | dict[str, Any],
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 4,
    max_new_tokens: int = 64,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
    num_slots: int = 64,
    seq_len: int = 256,
    rows_per_call: int = 16,
    moe_impl: str | None = None,
    entropy_fn: Callable[..., tuple[jax.Array, jax.Array]] | None = None,
) -> EntropyProbe:
    """Sample ``n`` responses per prompt (``sample_for_entropy``) and measure them (``completion_entropy``)."""
    comps = sample_for_entropy(
        graphdef,
        params,
        prompts,
        n=n,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        seed=seed,
        num_slots=num_slots,
        moe_impl=moe_impl,
    )
    return completion_entropy(
        graphdef, params, comps, seq_len=seq_len, rows_per_call=rows_per_call, entropy_fn=entropy_fn
    )
