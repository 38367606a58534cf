"""Procedural verifiable tasks with worked solutions, for the CPU pipeline (SFT text and RL prompts).

Problems come from reasoning-gym generators (via ``ring_jax.rewards.logic.make_records``) and are scored by its
scorers; this module only adds a compact prompt (a small model pays for every prompt token) and a step-by-step
worked solution for SFT:

- ``chain_sum`` (task ``arithmetic``): "12 + 34 - 7 =" -> "12 + 34 = 46\\n46 - 7 = 39\\n<answer>39</answer>"
- ``countdown`` (task ``countdown``): reach a target with the given numbers -> the reference expression evaluated
  one operation at a time, then "<answer>expression</answer>".

Held-out by construction (``ring_jax.data.splits``): every problem has a key, the generator's parameters (the chain
sum's expression; countdown's numbers as a multiset and its target), and a hash of that key alone puts it on the
train side or the held-out side.  ``make_task_records(..., split="train")`` keeps
only train-side problems (SFT solutions, RL prompts) and ``split="eval"`` only held-out ones, whatever the seeds, so
no eval problem can reach training, in any family that shares a key space (chain_sum and chain_sum_1d do).
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from ring_jax.data.splits import HELD_OUT_FRACTION, is_held_out, problem_key
from ring_jax.rewards.logic import make_records

__all__ = ["FAMILIES", "HELD_OUT_FRACTION", "make_task_records", "truncate_solutions", "worked_solution"]

FAMILIES = {
    "chain_sum": dict(
        task="arithmetic", dataset="chain_sum", kwargs=dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2)
    ),
    "countdown": dict(
        task="countdown",
        dataset="countdown",
        kwargs=dict(min_numbers=3, max_numbers=3, min_value=1, max_value=20, min_target=10, max_target=100),
    ),
    # Easier twins sized for the CPU pipeline: a 22M model trained for minutes reaches a pass@1 that leaves RL
    # both signal and headroom (see BUILD_NOTES, issue 7).
    "chain_sum_1d": dict(
        task="arithmetic", dataset="chain_sum", kwargs=dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)
    ),
    "countdown_10": dict(
        task="countdown",
        dataset="countdown",
        kwargs=dict(min_numbers=3, max_numbers=3, min_value=1, max_value=10, min_target=5, max_target=30),
    ),
    # countdown_10's problem space is ~1,500 (number multiset, target) pairs: too few for a held-out side of 1,000
    # distinct problems. Numbers up to 15 and targets up to 40 give ~5,000+.
    "countdown_15": dict(
        task="countdown",
        dataset="countdown",
        kwargs=dict(min_numbers=3, max_numbers=3, min_value=1, max_value=15, min_target=5, max_target=40),
    ),
}
_MAX_ROUNDS = 64  # generator rounds before a split is declared exhausted
_OPS = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),
}


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def expression_steps(expr: str) -> tuple[list[str], Fraction]:
    """Evaluate an arithmetic expression one binary operation at a time, left to right, innermost first."""
    steps: list[str] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            sym, fn = _OPS[type(node.op)]
            r = Fraction(fn(a, b))
            steps.append(f"{_fmt(a)} {sym} {_fmt(b)} = {_fmt(r)}")
            return r
        raise ValueError(f"unsupported expression {expr!r}")

    value = ev(ast.parse(expr, mode="eval"))
    return steps, value


def compact_prompt(record: dict) -> str:
    meta = record["gym"]["entry"]["metadata"]
    if record["task"] == "countdown":
        nums = " ".join(str(n) for n in meta["numbers"])
        return f"Use {nums} to make {meta['target']}."
    return f"{meta['expression']} ="


def worked_solution(record: dict) -> str:
    meta = record["gym"]["entry"]["metadata"]
    steps, value = expression_steps(meta["expression"])
    final = meta["expression"] if record["task"] == "countdown" else _fmt(value)
    return "\n".join(steps + [f"<answer>{final}</answer>"])


def _generate(family: str, n: int, seed: int) -> list[dict]:
    f = FAMILIES[family]
    recs = make_records(f["task"], n, seed, dataset=f["dataset"], prompt_suffix="", **f["kwargs"])
    for r in recs:
        r["prompt"] = compact_prompt(r)
        r["solution"] = worked_solution(r)
        r["family"] = family
    return recs


def make_task_records(family: str, n: int, seed: int, split: str | None = None, distinct: bool = False) -> list[dict]:
    """``n`` records of a task family: reward-ready (``task``, ``gym``) with a compact ``prompt``, the worked
    ``solution`` text, ``family`` and (with a split) ``problem_key``.

    ``split``: None draws from the whole problem space; "train" keeps only train-side problems, "eval" only
    held-out ones (``is_held_out``), drawing more from the generator until ``n`` pass.  ``distinct`` keeps one
    record per problem (an eval set); otherwise problems repeat as often as the generator draws them.  A split
    or a distinct set the family's problem space cannot fill raises ValueError naming how many it has."""
    if family not in FAMILIES:
        raise KeyError(f"unknown task family {family!r}; known: {sorted(FAMILIES)}")
    if split not in (None, "train", "eval"):
        raise ValueError(f"split must be None, 'train' or 'eval', got {split!r}")
    if split is None and not distinct:
        return _generate(family, n, seed)
    out, seen = [], set()
    chunk = max(64, 2 * n)
    for rnd in range(_MAX_ROUNDS):
        for r in _generate(family, chunk, seed + 1_000_003 * rnd):
            k = problem_key(r)
            if split is not None and is_held_out(k) != (split == "eval"):
                continue
            if distinct and k in seen:
                continue
            seen.add(k)
            r["problem_key"] = k
            out.append(r)
            if len(out) == n:
                return out
    raise ValueError(
        f"{family}: only {len(out)} {'distinct ' if distinct else ''}problems on the "
        f"{split or 'whole'} side after {_MAX_ROUNDS} rounds of {chunk} draws; asked for {n} "
        f"(the family's problem space is too small for this split)"
    )


def truncate_solutions(records: list[dict], fraction: float, seed: int) -> int:
    """Cut the final ``<answer>`` line off a ``fraction`` of the records' worked solutions, in place (seeded); returns
    how many were cut.  Models an imperfect long-CoT corpus, whose traces sometimes stop before their answer (a
    length limit hit, a teacher that trails off): SFT imitates the habit, a verifiable reward does not pay for it."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"truncated fraction must be in [0, 1), got {fraction}")
    rng = random.Random(seed)
    cut = 0
    for r in records:
        if rng.random() < fraction and "\n" in r["solution"]:
            r["solution"] = r["solution"].rsplit("\n", 1)[0]
            cut += 1
    return cut
