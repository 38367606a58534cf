"""Procedural verifiable tasks with worked solutions, for the CPU pipeline (SFT text and RL prompts).

Problems come from reasoning-gym generators (via ``ring_jax.rewards.logic.make_records``) and are scored by its
scorers; this module only adds a compact prompt (a small model pays for every prompt token) and a step-by-step
worked solution for SFT:

- ``chain_sum`` (task ``arithmetic``): "12 + 34 - 7 =" -> "12 + 34 = 46\\n46 - 7 = 39\\n<answer>39</answer>"
- ``countdown`` (task ``countdown``): reach a target with the given numbers -> the reference expression evaluated
  one operation at a time, then "<answer>expression</answer>".
"""

from __future__ import annotations

import ast
import operator
import random
from fractions import Fraction

from ring_jax.rewards.logic import make_records

FAMILIES = {
    "chain_sum": dict(task="arithmetic", dataset="chain_sum",
                      kwargs=dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2)),
    "countdown": dict(task="countdown", dataset="countdown",
                      kwargs=dict(min_numbers=3, max_numbers=3, min_value=1, max_value=20, min_target=10,
                                  max_target=100)),
    # Easier twins sized for the CPU pipeline: a 22M model trained for minutes reaches a pass@1 that leaves RL
    # both signal and headroom (see BUILD_NOTES, issue 7).
    "chain_sum_1d": dict(task="arithmetic", dataset="chain_sum",
                         kwargs=dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1)),
    "countdown_10": dict(task="countdown", dataset="countdown",
                         kwargs=dict(min_numbers=3, max_numbers=3, min_value=1, max_value=10, min_target=5,
                                     max_target=30)),
}
_OPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
        ast.Div: ("/", operator.truediv)}


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


def make_task_records(family: str, n: int, seed: int) -> list[dict]:
    """``n`` records of a task family: reward-ready (``task``, ``gym``) with a compact ``prompt`` and the worked
    ``solution`` text."""
    if family not in FAMILIES:
        raise KeyError(f"unknown task family {family!r}; known: {sorted(FAMILIES)}")
    f = FAMILIES[family]
    recs = make_records(f["task"], n, seed, dataset=f["dataset"], prompt_suffix="", **f["kwargs"])
    for r in recs:
        r["prompt"] = compact_prompt(r)
        r["solution"] = worked_solution(r)
        r["family"] = family
    return recs


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
