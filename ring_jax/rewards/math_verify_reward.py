"""Task "math": binary reward from the last ``\\boxed{...}`` checked by Hugging Face math-verify.

Ring-lite uses a pure correctness reward for math (no format reward): 1.0 if the final boxed answer is
mathematically equivalent to the gold answer ``record["answer"]``, else 0.0 (also when there is no
boxed answer or it is unterminated).

math-verify's own timeouts use ``signal.alarm``, which only works in the main thread (its `parse`
raises ValueError elsewhere). The registry runs rewards in worker threads, so off the main thread we
call it with ``parsing_timeout=None`` / ``timeout_seconds=None`` and rely on the registry's
thread timeout instead; on the main thread (direct calls) the signal timeouts stay on.
"""

from __future__ import annotations

import threading
from typing import Any

from ring_jax.rewards.extract import last_boxed
from ring_jax.rewards.registry import register

MATH_PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
MATH_TIMEOUT_S = 5  # math-verify's per-call signal timeout when running on the main thread
MAX_ANSWER_CHARS = 2000  # longer boxed answers are rejected (sympy can blow up on huge inputs)


def _mv():
    import math_verify  # lazy: pulls in sympy + latex2sympy (~0.5 s)

    return math_verify


def warmup() -> None:
    """Import math-verify and its parsers now (the first call otherwise pays ~1 s)."""
    mv = _mv()
    one = mv.parse("\\boxed{1}", parsing_timeout=None)
    mv.verify(one, one, timeout_seconds=None)


def _timeout() -> int | None:
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(latex_answer: str):
    """Parse an answer (LaTeX or plain) the way math-verify parses a boxed expression."""
    return _mv().parse("\\boxed{" + latex_answer + "}", parsing_timeout=_timeout())


def is_equivalent(pred: str, gold: str) -> bool:
    """Whether answer strings `pred` and `gold` (contents of a box, LaTeX or plain) are equivalent."""
    gold_parsed = _parse(gold)
    if not gold_parsed:
        raise ValueError(f"math-verify could not parse the gold answer {gold!r}")
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return False
    return bool(_mv().verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))


def math_reward(record: dict, response: str) -> float:
    gold = record["answer"]
    if not isinstance(gold, str):
        gold = str(gold)
    pred = last_boxed(response)
    if pred is None or not pred or len(pred) > MAX_ANSWER_CHARS:
        return 0.0
    return 1.0 if is_equivalent(pred, gold) else 0.0


register("math")(math_reward)


def make_math_record(problem: str, answer: str, **extra: Any) -> dict:
    """A "math" prompt record: the problem with `MATH_PROMPT_SUFFIX` appended and the gold answer."""
    return {"task": "math", "prompt": f"{problem.rstrip()}\n{MATH_PROMPT_SUFFIX}", "answer": str(answer), **extra}
