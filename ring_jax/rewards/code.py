"""The "code" reward: run the response's program against the record's tests in the sandbox.

Records::

    {"task": "code", "prompt": ..., "tests": [{"input": "<stdin>", "output": "<expected stdout>"}, ...]}
    {"task": "code", "prompt": ..., "tests_code": "assert f(1) == 2\\n...", "entry_point": "f"}   # optional

Reward 1.0 only if every test passes, else 0.0.  The program is the last ```python fenced block of the
response (after the last ``</think>``, if any); failing that, the last fenced block of any language.  No block
-> 0.0.

* stdin/stdout tests: the program gets ``input`` on stdin; a test passes when it exits with status 0, in time,
  and its stdout equals ``output`` after stripping trailing whitespace from every line and dropping trailing
  empty lines.  Tests run in parallel on at most 2 threads; the first failure stops the rest (unstarted ones
  are cancelled; at most one more, already running, finishes).
* ``tests_code``: appended to the program (HumanEval/MBPP style); if it defines ``check`` and the record has an
  ``entry_point``, ``check(<entry_point>)`` is called.  Passes when the whole thing exits with status 0 *and*
  its last stdout line is a random nonce that the harness reads from stdin and prints after the asserts; so a
  program that calls ``exit(0)`` / ``os._exit(0)`` before the asserts (a known reward hack) scores 0.
* All tests of one response share a time budget of ``total_s`` (default TOTAL_TIMEOUT_S); past it the reward is
  0.0 and counted as a timeout.

A reward that raises (e.g. the sandbox cannot be set up) or times out scores 0.0 and is counted in
``code_reward_stats()``; it never propagates to the caller.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import logging
import re
import secrets
import threading
import time

from ring_jax.rewards.code_sandbox import SandboxLimits, SandboxResult, run_python
from ring_jax.rewards.extract import strip_thinking
from ring_jax.rewards.registry import register

log = logging.getLogger(__name__)

MAX_WORKERS = 2
DEFAULT_LIMITS = SandboxLimits()
TOTAL_TIMEOUT_S = 30.0  # all tests of one response; keep the registry's timeout for "code" at least this

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)
_PY_TAGS = {"python", "py", "python3", "py3"}

_stats = collections.Counter()
_stats_lock = threading.Lock()


def _count(key: str) -> None:
    with _stats_lock:
        _stats[key] += 1


def code_reward_stats() -> dict[str, int]:
    """Counters since start: calls, passed, failed, no_code, timeouts, errors."""
    with _stats_lock:
        return dict(_stats)


def extract_program(response: str) -> str | None:
    """The last ```python block of the final answer, else the last fenced block; None if there is none."""
    blocks = _FENCE.findall(strip_thinking(response))
    if not blocks:
        return None
    py = [code for tag, code in blocks if tag.lower() in _PY_TAGS]
    code = py[-1] if py else blocks[-1][1]
    return code if code.strip() else None


def _normalise(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _passed(res: SandboxResult, expected: str | None) -> bool:
    if res.timed_out or res.killed_reason is not None or res.returncode != 0:
        return False
    return expected is None or _normalise(res.stdout) == _normalise(expected)


def _run_io_tests(program: str, tests: list[dict], limits: SandboxLimits, total_s: float) -> tuple[bool, bool]:
    """(all passed, some test timed out or the budget ran out)."""
    deadline = time.monotonic() + total_s
    timed_out = False
    with cf.ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(tests))) as pool:
        futures = [pool.submit(run_python, program, str(t.get("input", "")), limits) for t in tests]
        try:
            for fut, test in zip(futures, tests):  # in order: the first failure decides, the rest is cancelled
                try:
                    res = fut.result(timeout=max(deadline - time.monotonic(), 0.0))
                except cf.TimeoutError:  # the running test still ends within its own wall limit
                    return False, True
                timed_out |= res.timed_out
                if not _passed(res, str(test.get("output", ""))):
                    return False, timed_out
        finally:
            for fut in futures:
                fut.cancel()
    return True, timed_out


def _run_tests_code(program: str, record: dict, limits: SandboxLimits) -> tuple[bool, bool]:
    tests_code = str(record["tests_code"])
    source = program.rstrip() + "\n\n" + tests_code.rstrip() + "\n"
    entry = record.get("entry_point")
    if entry and re.search(r"^def check\(", tests_code, re.MULTILINE):
        source += f"\ncheck({entry})\n"
    # Reached only if nothing above exited early; the nonce is not in the source, only on stdin.
    source += "\nimport sys as _sys\nprint('\\n' + _sys.stdin.readline().strip(), flush=True)\n"
    nonce = secrets.token_hex(16)
    res = run_python(source, nonce + "\n", limits)
    lines = _normalise(res.stdout)
    ok = _passed(res, None) and bool(lines) and lines[-1] == nonce
    return ok, res.timed_out


def _score(record: dict, response: str, limits: SandboxLimits, total_s: float) -> float:
    program = extract_program(response)
    if program is None:
        _count("no_code")
        return 0.0
    tests = record.get("tests")
    if isinstance(tests, str):
        tests = json.loads(tests)
    if tests:
        ok, timed_out = _run_io_tests(program, list(tests), limits, total_s)
    elif record.get("tests_code"):
        ok, timed_out = _run_tests_code(program, record, limits)
    else:
        raise ValueError("code record has neither 'tests' nor 'tests_code'")
    if timed_out:
        _count("timeouts")
    _count("passed" if ok else "failed")
    return 1.0 if ok else 0.0


def code_reward(
    record: dict, response: str, limits: SandboxLimits | None = None, total_s: float = TOTAL_TIMEOUT_S
) -> float:
    """1.0 if the response's program passes all of the record's tests, else 0.0.  Never raises."""
    _count("calls")
    try:
        return _score(record, response, limits or DEFAULT_LIMITS, total_s)
    except Exception:  # noqa: BLE001 - a broken record or sandbox must not take the trainer down
        _count("errors")
        log.exception("code reward failed; scoring 0")
        return 0.0


register("code")(code_reward)
