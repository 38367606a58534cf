"""General-domain rewards: rule-based instruction following ("ifeval") and a learned reward model.

"ifeval": ``record["constraints"]`` is a list of dicts with a "type" (see `CONSTRAINT_CHECKS`);
the reward is the fraction satisfied. Checks look only at the final answer: the text after the
last ``</think>`` (whole response if none), stripped.

    max_words n / min_words n    whitespace-separated word count <= n / >= n
    include_keywords words       every word occurs (case-insensitive, whole-word)
    exclude_keywords words       no word occurs (case-insensitive, whole-word)
    lowercase                    no uppercase letters (and non-empty)
    num_paragraphs n             exactly n non-empty paragraphs separated by blank lines
    ends_with text               answer ends with `text` (case-sensitive, surrounding space ignored)
    json_format                  the answer (optionally inside a ``` / ```json fence) is valid JSON

"reward_model": scored by the model registered with `register_reward_model`; anything with
``score_batch(prompts, responses) -> list[float]`` fits the `RewardModel` protocol. The record
supplies ``record["prompt"]``; the response is passed unchanged (thinking included), the model
decides what it looks at. `score_batch` of the registry calls the model once per batch.
The project's learned reward model (BailingMoe backbone + scalar value head, scored on the mesh, Bradley-Terry
training) is ``ring_jax.rl.reward_model.LearnedRewardModel``; it lives in ``rl`` (its network in
``ring_jax.model.reward_head``, its trainer in ``ring_jax.rl.reward_trainer``) because ``rewards`` imports nothing
from ``model``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ring_jax.rewards.extract import strip_thinking
from ring_jax.rewards.registry import register, register_batch

# --------------------------------------------------------------------------- ifeval


def _n(c: dict) -> int:
    if "n" not in c:
        raise ValueError(f"constraint {c.get('type')!r} needs an integer 'n': {c}")
    return int(c["n"])


def _words(c: dict) -> list[str]:
    words = c.get("words")
    if isinstance(words, str):
        words = [words]
    if not words:
        raise ValueError(f"constraint {c.get('type')!r} needs a non-empty 'words' list: {c}")
    return [str(w) for w in words]


def _has_word(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def _is_json(text: str) -> bool:
    m = _FENCE_RE.match(text)
    if m:
        text = m.group(1).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _ends_with(text: str, c: dict) -> bool:
    if "text" not in c or not str(c["text"]).strip():
        raise ValueError(f"constraint 'ends_with' needs a non-empty 'text': {c}")
    return text.rstrip().endswith(str(c["text"]).strip())


CONSTRAINT_CHECKS: dict[str, Callable[[str, dict], bool]] = {
    "max_words": lambda t, c: len(t.split()) <= _n(c),
    "min_words": lambda t, c: len(t.split()) >= _n(c),
    "include_keywords": lambda t, c: all(_has_word(t, w) for w in _words(c)),
    "exclude_keywords": lambda t, c: not any(_has_word(t, w) for w in _words(c)),
    "lowercase": lambda t, c: bool(t) and t == t.lower(),
    "num_paragraphs": lambda t, c: len(_paragraphs(t)) == _n(c),
    "ends_with": _ends_with,
    "json_format": lambda t, c: _is_json(t),
}


def check_constraint(text: str, constraint: dict) -> bool:
    """Whether the (already thinking-stripped) answer `text` satisfies one constraint."""
    if not isinstance(constraint, dict) or "type" not in constraint:
        raise ValueError(f"a constraint must be a dict with a 'type', got {constraint!r}")
    ctype = constraint["type"]
    check = CONSTRAINT_CHECKS.get(ctype)
    if check is None:
        raise ValueError(f"unknown ifeval constraint type {ctype!r}; known: {sorted(CONSTRAINT_CHECKS)}")
    return bool(check(text, constraint))


def ifeval_reward(record: dict, response: str) -> float:
    constraints = record.get("constraints")
    if not constraints:
        raise ValueError("ifeval record needs a non-empty 'constraints' list")
    text = strip_thinking(response).strip()
    results = [check_constraint(text, c) for c in constraints]  # validate all, no short-circuit
    return sum(results) / len(results)


register("ifeval")(ifeval_reward)


# --------------------------------------------------------------------------- reward model


@runtime_checkable
class RewardModel(Protocol):
    def score_batch(self, prompts: list[str], responses: list[str]) -> list[float]: ...


_RM: RewardModel | None = None
_RM_LOCK = threading.Lock()


def register_reward_model(model: RewardModel | None) -> None:
    """Set (or with None, clear) the model used by the "reward_model" task."""
    if model is not None and not callable(getattr(model, "score_batch", None)):
        raise TypeError(f"reward model must have a callable score_batch(prompts, responses), got {model!r}")
    global _RM
    with _RM_LOCK:
        _RM = model


def get_reward_model() -> RewardModel:
    with _RM_LOCK:
        model = _RM
    if model is None:
        raise RuntimeError(
            "no reward model registered for task 'reward_model'; "
            "call ring_jax.rewards.general.register_reward_model(model) first"
        )
    return model


def reward_model_batch(records: list[dict], responses: list[str]) -> list[float]:
    model = get_reward_model()
    prompts = [r["prompt"] for r in records]
    scores = list(model.score_batch(prompts, list(responses)))
    if len(scores) != len(records):
        raise ValueError(f"reward model returned {len(scores)} scores for {len(records)} responses")
    return [float(s) for s in scores]


def reward_model_reward(record: dict, response: str) -> float:
    return reward_model_batch([record], [response])[0]


register("reward_model")(reward_model_reward)
register_batch("reward_model")(reward_model_batch)
