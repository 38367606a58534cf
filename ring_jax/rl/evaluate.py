"""pass@1 on held-out prompts, as Ring-lite evaluates: sample ``n`` responses per prompt (temperature 1.0,
top-p 0.95 by default), score each with the task's verifier, and average "solved" (reward == 1.0; reasoning-gym
scorers give partial credit below 1) over samples and prompts."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ring_jax.rewards import registry as rewards
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import SamplingParams


@dataclasses.dataclass(frozen=True)
class EvalResult:
    pass_at_1: float
    per_task: dict
    mean_reward: float
    response_len: float
    num_prompts: int
    samples: list  # (prompt text, response text, reward) for the first few prompts


def evaluate(graphdef, params, records: Sequence[dict], *, encode_prompt: Callable, decode: Callable,
             stop_ids=(), n: int = 4, temperature: float = 1.0, top_p: float = 0.95, max_new_tokens: int = 64,
             seed: int = 0, num_slots: int = 32, moe_impl: str | None = None, timeout_s: float = 30.0) -> EvalResult:
    engine = SamplingEngine(graphdef, params, num_slots=num_slots, moe_impl=moe_impl)
    prompts = [list(map(int, encode_prompt(r))) for r in records]
    sp = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=n,
                        stop_token_ids=tuple(stop_ids))
    comps = engine.generate(prompts, sp, key=seed)
    stop = set(stop_ids)
    texts = [decode([t for t in c.token_ids.tolist() if t not in stop]) for c in comps]
    recs = [records[c.prompt_index] for c in comps]
    results, _ = rewards.score_batch(recs, texts, timeout_s=timeout_s)
    r = np.array([x.reward for x in results])
    solved = (r >= 1.0).astype(np.float64)
    tasks = [rec.get("family", rec.get("task")) for rec in recs]
    per_task = {t: float(solved[[i for i, tt in enumerate(tasks) if tt == t]].mean()) for t in sorted(set(tasks))}
    samples = [(records[c.prompt_index].get("prompt", ""), texts[i], float(r[i])) for i, c in enumerate(comps)
               if c.sample_index == 0][:5]
    return EvalResult(float(solved.mean()), per_task, float(r.mean()),
                      float(np.mean([len(c.token_ids) for c in comps])), len(records), samples)
