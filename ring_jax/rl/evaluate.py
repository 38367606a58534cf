"""Held-out evaluation as Ring-lite reports it, plus what separates a real gain from sharpening or length repair.

Per family (``record["family"]``, else its task), on the same prompts:

- ``pass@1``: ``n`` responses per prompt at temperature 1.0 / top-p 0.95 (Ring-lite's setting), "solved" = reward
  1.0 (reasoning-gym scorers give partial credit below 1), averaged over samples and prompts;
- ``pass@k`` for k = ``n``: the share of prompts with at least one solved sample;
- ``greedy``: one greedy response per prompt (sharpening alone cannot raise it);
- mean response length and the share of ``unfinished`` responses (no complete ``<answer>`` tag: cut by the length
  limit or stopped early).

Every rate comes with a 95% interval over prompts: the ``n`` samples of one prompt are not independent, so the
standard error is that of the per-prompt means (``se = sd / sqrt(prompts)``); for the one-per-prompt rates (greedy,
pass@k) it is the Wilson interval.  ``per_prompt`` keeps each prompt's figures, keyed by its problem, so that two
evaluations on the same prompts can be compared pairwise (``paired_difference``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ring_jax.data.splits import problem_key
from ring_jax.rewards import registry as rewards
from ring_jax.rewards.extract import last_answer_tag
from ring_jax.sampling.engine import SamplingEngine
from ring_jax.sampling.types import SamplingParams

Z95 = 1.959964


@dataclasses.dataclass(frozen=True)
class Rate:
    """A rate over ``n`` prompts with its 95% interval and standard error."""

    value: float
    lo: float
    hi: float
    se: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_interval(per_prompt: Sequence[float]) -> Rate:
    """Mean of per-prompt values with a normal 95% interval from their spread (clustered by prompt)."""
    x = np.asarray(per_prompt, np.float64)
    if x.size == 0:
        return Rate(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    m = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")
    return Rate(m, m - Z95 * se, m + Z95 * se, se, int(x.size))


def wilson_interval(successes: int, n: int) -> Rate:
    """A binomial rate with its Wilson 95% interval (sensible at 0 and 1, where the normal one collapses)."""
    if n == 0:
        return Rate(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    p = successes / n
    d = 1 + Z95**2 / n
    c = (p + Z95**2 / (2 * n)) / d
    h = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / d
    return Rate(p, c - h, c + h, math.sqrt(p * (1 - p) / n), n)


def paired_difference(before: dict, after: dict, field: str) -> Rate:
    """``after - before`` of a per-prompt field over the prompts both evaluations share, with the 95% interval of
    the paired differences (tighter than two independent intervals: prompt difficulty cancels)."""
    keys = sorted(set(before) & set(after))
    return mean_interval([after[k][field] - before[k][field] for k in keys])


@dataclasses.dataclass(frozen=True)
class FamilyMetrics:
    pass_at_1: Rate
    pass_at_k: Rate
    greedy: Rate | None
    response_len: float
    unfinished: Rate
    num_prompts: int

    def as_dict(self) -> dict:
        return {
            "pass_at_1": self.pass_at_1.as_dict(),
            "pass_at_k": self.pass_at_k.as_dict(),
            "greedy": self.greedy.as_dict() if self.greedy else None,
            "response_len": self.response_len,
            "unfinished": self.unfinished.as_dict(),
            "num_prompts": self.num_prompts,
        }


@dataclasses.dataclass(frozen=True)
class EvalResult:
    pass_at_1: float
    per_task: dict  # family -> pass@1
    mean_reward: float
    response_len: float
    num_prompts: int
    samples: list  # (prompt text, response text, reward) for the first few prompts
    n: int = 1
    families: dict = dataclasses.field(default_factory=dict)  # family -> FamilyMetrics
    overall: FamilyMetrics | None = None
    per_prompt: dict = dataclasses.field(default_factory=dict)  # problem key -> {family, solved, greedy, ...}


def _metrics(rows: list[dict], n: int, with_greedy: bool) -> FamilyMetrics:
    p1 = mean_interval([r["solved"] / n for r in rows])
    pk = wilson_interval(sum(r["solved"] > 0 for r in rows), len(rows))
    gr = wilson_interval(sum(r["greedy"] for r in rows), len(rows)) if with_greedy else None
    unf = mean_interval([r["unfinished"] / n for r in rows])
    return FamilyMetrics(p1, pk, gr, float(np.mean([r["length"] for r in rows])), unf, len(rows))


def _score(records, comps, decode, stop, timeout_s):
    texts = [decode([t for t in c.token_ids.tolist() if t not in stop]) for c in comps]
    results, _ = rewards.score_batch([records[c.prompt_index] for c in comps], texts, timeout_s=timeout_s)
    return texts, np.array([x.reward for x in results])


def evaluate(
    graphdef: nnx.GraphDef,
    params: nnx.State | dict[str, Any],
    records: Sequence[dict],
    *,
    encode_prompt: Callable,
    decode: Callable,
    stop_ids: Sequence[int] = (),
    n: int = 4,
    temperature: float = 1.0,
    top_p: float = 0.95,
    max_new_tokens: int = 64,
    seed: int = 0,
    num_slots: int = 32,
    moe_impl: str | None = None,
    timeout_s: float = 30.0,
    greedy: bool = True,
) -> EvalResult:
    """Sampled pass@1 / pass@n and (``greedy``) greedy accuracy of ``params`` on ``records``; see the module doc."""
    engine = SamplingEngine(graphdef, params, num_slots=num_slots, moe_impl=moe_impl)
    prompts = [list(map(int, encode_prompt(r))) for r in records]
    stop = set(stop_ids)
    sp = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=n, stop_token_ids=tuple(stop_ids)
    )
    comps = engine.generate(prompts, sp, key=seed)
    texts, r = _score(records, comps, decode, stop, timeout_s)
    solved = r >= 1.0
    rows = [
        {
            "family": rec.get("family", rec.get("task")),
            "key": problem_key(rec),
            "solved": 0,
            "greedy": 0,
            "unfinished": 0,
            "length": 0.0,
        }
        for rec in records
    ]
    for i, c in enumerate(comps):
        row = rows[c.prompt_index]
        row["solved"] += int(solved[i])
        row["unfinished"] += int(last_answer_tag(texts[i]) is None)
        row["length"] += len(c.token_ids) / n
    if greedy:
        gp = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, n=1, stop_token_ids=tuple(stop_ids))
        gcomps = engine.generate(prompts, gp, key=seed)
        _, gr = _score(records, gcomps, decode, stop, timeout_s)
        for i, c in enumerate(gcomps):
            rows[c.prompt_index]["greedy"] = int(gr[i] >= 1.0)
    fams = sorted({row["family"] for row in rows})
    families = {f: _metrics([row for row in rows if row["family"] == f], n, greedy) for f in fams}
    overall = _metrics(rows, n, greedy)
    per_prompt = {}
    for row in rows:  # duplicate problems (a user file) keep their last figures; generated eval sets are distinct
        per_prompt[f"{row['family']}|{row['key']}"] = {
            "family": row["family"],
            "solved": row["solved"] / n,
            "any": int(row["solved"] > 0),
            "greedy": row["greedy"] if greedy else None,
            "unfinished": row["unfinished"] / n,
            "length": row["length"],
        }
    samples = [
        (records[c.prompt_index].get("prompt", ""), texts[i], float(r[i]))
        for i, c in enumerate(comps)
        if c.sample_index == 0
    ][:5]
    return EvalResult(
        float(solved.mean()),
        {f: m.pass_at_1.value for f, m in families.items()},
        float(r.mean()),
        float(np.mean([len(c.token_ids) for c in comps])),
        len(records),
        samples,
        n=n,
        families=families,
        overall=overall,
        per_prompt=per_prompt,
    )
