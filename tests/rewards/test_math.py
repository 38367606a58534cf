"""Task "math": last-\\boxed{} extraction and math-verify equivalence."""

import threading

import pytest

import ring_jax.rewards  # noqa: F401
from ring_jax.rewards import math_verify_reward as mvr
from ring_jax.rewards.extract import last_boxed
from ring_jax.rewards.registry import score


def rec(answer):
    return {"task": "math", "prompt": "q", "answer": answer}


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\frac{\sqrt{2}}{\sqrt{3}}} end", r"\frac{\sqrt{2}}{\sqrt{3}}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\boxed {  7 }", "7"),
        (r"\boxed{3} and later \boxed{\frac{1}{2", None),  # truncated last box: no answer
        ("no box here", None),
        ("", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_prompt_suffix():
    assert mvr.MATH_PROMPT_SUFFIX == "Please reason step by step, and put your final answer within \\boxed{}."
    r = mvr.make_math_record("What is 1/2?", "0.5")
    assert r["task"] == "math" and r["prompt"].endswith(mvr.MATH_PROMPT_SUFFIX) and r["answer"] == "0.5"


@pytest.mark.parametrize(
    "response, gold, reward",
    [
        (r"Thus the answer is \boxed{\frac{1}{2}}.", "0.5", 1.0),
        (r"\boxed{0.4}", "0.5", 0.0),
        (r"The answer is 0.5", "0.5", 0.0),  # no box, no reward
        (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", 1.0),  # nested braces
        (r"first \boxed{3}, but actually \boxed{\frac{1}{2}}", "1/2", 1.0),  # last box wins
        (r"first \boxed{\frac{1}{2}}, but actually \boxed{3}", "1/2", 0.0),
        (r"\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
        (r"\boxed{\{2, 1\}}", r"\{1,2\}", 1.0),
        (r"<think>maybe \boxed{5}</think> \boxed{4}", "4", 1.0),
    ],
)
def test_math_reward(response, gold, reward):
    res = score(rec(gold), response)  # runs in a worker thread (signal-free math-verify path)
    assert res.error is None and not res.timed_out
    assert res.reward == reward


def test_math_reward_main_thread_and_thread():
    # direct call on the main thread uses math-verify's signal timeouts
    assert mvr.math_reward(rec("2"), r"\boxed{2}") == 1.0
    out = []
    th = threading.Thread(target=lambda: out.append(mvr.math_reward(rec("2"), r"\boxed{2.0}")))
    th.start()
    th.join(30)
    assert out == [1.0]


def test_overlong_answer_rejected():
    assert mvr.math_reward(rec("1"), "\\boxed{" + "1" * (mvr.MAX_ANSWER_CHARS + 1) + "}") == 0.0
