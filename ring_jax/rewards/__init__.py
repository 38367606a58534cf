"""Rule-based and model-based rewards for RL (plain host-side Python: no jax / flax / ring_jax.model).

Importing this package registers the built-in tasks:
  math                                   -> math_verify_reward (math-verify on the last \\boxed{})
  countdown, sudoku, maze, arc, arithmetic -> logic (reasoning-gym generators + scorers)
  ifeval, reward_model                   -> general
  code (when present)                    -> code (sandboxed execution, separate module)

Usage: ``results, stats = score_batch(records, responses)``; see `registry` for the safety contract.
Heavy libraries (math-verify/sympy, reasoning-gym) are imported lazily; call `warmup()` once before
timing-sensitive scoring so the first reward does not spend its timeout on imports.
"""

import importlib

from ring_jax.rewards import general, logic, math_verify_reward  # noqa: F401 (importing them registers their tasks)
from ring_jax.rewards.general import RewardModel, register_reward_model
from ring_jax.rewards.logic import LOGIC_PROMPT_SUFFIX, make_records
from ring_jax.rewards.math_verify_reward import MATH_PROMPT_SUFFIX, make_math_record
from ring_jax.rewards.registry import (
    PASS_THRESHOLD,
    RewardFn,
    RewardResult,
    RewardStats,
    TaskStats,
    get,
    list_tasks,
    register,
    register_batch,
    score,
    score_batch,
    summarize,
)

try:  # written separately; registers "code"
    importlib.import_module("ring_jax.rewards.code")
except ModuleNotFoundError as _e:
    if _e.name != "ring_jax.rewards.code":  # the module exists but one of ITS imports is missing
        raise


def warmup() -> None:
    """Import the lazily loaded scoring libraries now."""
    math_verify_reward.warmup()
    logic.warmup()


__all__ = [
    "LOGIC_PROMPT_SUFFIX",
    "MATH_PROMPT_SUFFIX",
    "PASS_THRESHOLD",
    "RewardFn",
    "RewardModel",
    "RewardResult",
    "RewardStats",
    "TaskStats",
    "get",
    "list_tasks",
    "make_math_record",
    "make_records",
    "register",
    "register_batch",
    "register_reward_model",
    "score",
    "score_batch",
    "summarize",
    "warmup",
]
