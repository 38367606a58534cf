"""Reward registry keyed by task type, with crash/timeout-safe scoring and batch statistics.

A reward function is ``fn(record: dict, response: str) -> float``; ``record["task"]`` selects it.
Built-in tasks register themselves when ``ring_jax.rewards`` is imported.

Safety contract of `score` / `score_batch`: they never raise because of a reward function. A reward
that raises, returns a non-finite / non-numeric value, or runs past its timeout scores 0.0 and the
`RewardResult` carries the error (and ``timed_out=True`` for timeouts).

Timeouts: each call runs in its own *daemon* thread; the caller waits on a
`concurrent.futures.Future` with a deadline, so the caller never hangs (and a stuck thread cannot
block interpreter exit, unlike `ThreadPoolExecutor` workers, which are joined at exit). Python
cannot kill a thread, though: a reward stuck in a pure-Python loop keeps burning CPU in the
background (see `abandoned_threads`). Rewards that can genuinely hang (executing model-written
code) must therefore do the dangerous part in their own subprocess (the code sandbox) and only
wait on it here. Threads share the GIL, so a CPU-bound reward is slowed by concurrent ones; keep
timeouts generous relative to a reward's normal run time.

Batch rewards: a task can also register a batch function ``fn(records, responses) -> list[float]``
(`register_batch`), e.g. a learned reward model that wants one forward pass per batch;
`score_batch` then calls it once for all records of that task.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[[dict, str], float]
BatchRewardFn = Callable[[list[dict], list[str]], list[float]]

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BATCH_TIMEOUT_S = 300.0
DEFAULT_MAX_WORKERS = 4
PASS_THRESHOLD = 0.5  # a response "passes" when reward > PASS_THRESHOLD
MISSING_TASK = "<missing>"  # stats bucket for records without a usable "task" field

_REGISTRY: dict[str, RewardFn] = {}
_BATCH_REGISTRY: dict[str, BatchRewardFn] = {}
_LOCK = threading.Lock()
_ABANDONED: list[threading.Thread] = []


# --------------------------------------------------------------------------- registration


def register(task_type: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(record, response) -> float`` for `task_type`."""
    if not isinstance(task_type, str) or not task_type:
        raise ValueError(f"task_type must be a non-empty string, got {task_type!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward for {task_type!r} must be callable, got {fn!r}")
        with _LOCK:
            if task_type in _REGISTRY and not overwrite:
                raise ValueError(f"reward for task {task_type!r} already registered ({_REGISTRY[task_type]!r})")
            _REGISTRY[task_type] = fn
        return fn

    return deco


def register_batch(task_type: str, *, overwrite: bool = False) -> Callable[[BatchRewardFn], BatchRewardFn]:
    """Decorator registering a batch reward ``fn(records, responses) -> list[float]`` for `task_type`.

    `score_batch` prefers it over the per-item function. If no per-item function is registered
    for the task, `get` returns a wrapper that calls the batch function with one item.
    """
    if not isinstance(task_type, str) or not task_type:
        raise ValueError(f"task_type must be a non-empty string, got {task_type!r}")

    def deco(fn: BatchRewardFn) -> BatchRewardFn:
        if not callable(fn):
            raise TypeError(f"batch reward for {task_type!r} must be callable, got {fn!r}")
        with _LOCK:
            if task_type in _BATCH_REGISTRY and not overwrite:
                raise ValueError(f"batch reward for task {task_type!r} already registered")
            _BATCH_REGISTRY[task_type] = fn
        return fn

    return deco


def unregister(task_type: str) -> None:
    """Remove a task (per-item and batch functions); no-op if unknown. Mainly for tests."""
    with _LOCK:
        _REGISTRY.pop(task_type, None)
        _BATCH_REGISTRY.pop(task_type, None)


def list_tasks() -> list[str]:
    """Sorted names of all registered task types."""
    with _LOCK:
        return sorted(set(_REGISTRY) | set(_BATCH_REGISTRY))


def get(task_type: str) -> RewardFn:
    """The per-item reward function of `task_type`; KeyError naming the known tasks if unknown."""
    with _LOCK:
        fn = _REGISTRY.get(task_type)
        batch_fn = _BATCH_REGISTRY.get(task_type)
    if fn is not None:
        return fn
    if batch_fn is not None:

        def single(record: dict, response: str, _b=batch_fn) -> float:
            out = list(_b([record], [response]))
            if len(out) != 1:
                raise ValueError(f"batch reward for {task_type!r} returned {len(out)} values for 1 input")
            return out[0]

        return single
    raise KeyError(f"unknown reward task {task_type!r}; known tasks: {list_tasks()}")


def get_batch(task_type: str) -> BatchRewardFn | None:
    """The batch reward function of `task_type`, or None if it has none."""
    with _LOCK:
        return _BATCH_REGISTRY.get(task_type)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RewardResult:
    reward: float
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class TaskStats:
    count: int
    mean_reward: float
    pass_rate: float  # fraction with reward > PASS_THRESHOLD
    n_errors: int  # failures other than timeouts
    n_timeouts: int


@dataclass(frozen=True)
class RewardStats:
    per_task: dict[str, TaskStats] = field(default_factory=dict)
    total: TaskStats = TaskStats(0, 0.0, 0.0, 0, 0)

    def to_dict(self, prefix: str = "reward") -> dict[str, float]:
        """Flat ``{"reward/<task>/mean": ..}`` dict for metric loggers (total under ``<prefix>/all``)."""
        out: dict[str, float] = {}
        items = [("all", self.total)] + sorted(self.per_task.items())
        for name, s in items:
            base = f"{prefix}/{name}"
            out[f"{base}/count"] = float(s.count)
            out[f"{base}/mean"] = s.mean_reward
            out[f"{base}/pass_rate"] = s.pass_rate
            out[f"{base}/n_errors"] = float(s.n_errors)
            out[f"{base}/n_timeouts"] = float(s.n_timeouts)
        return out


def _task_of(record: Any) -> str:
    if isinstance(record, dict) and isinstance(record.get("task"), str):
        return record["task"]
    return MISSING_TASK


def _stats(results: Sequence[RewardResult]) -> TaskStats:
    n = len(results)
    if n == 0:
        return TaskStats(0, 0.0, 0.0, 0, 0)
    return TaskStats(
        count=n,
        mean_reward=sum(r.reward for r in results) / n,
        pass_rate=sum(r.reward > PASS_THRESHOLD for r in results) / n,
        n_errors=sum(r.error is not None and not r.timed_out for r in results),
        n_timeouts=sum(r.timed_out for r in results),
    )


def summarize(records: Sequence[dict], results: Sequence[RewardResult]) -> RewardStats:
    """Aggregate per-task and overall statistics of already-scored records."""
    if len(records) != len(results):
        raise ValueError(f"{len(records)} records but {len(results)} results")
    by_task: dict[str, list[RewardResult]] = {}
    for rec, res in zip(records, results):
        by_task.setdefault(_task_of(rec), []).append(res)
    return RewardStats(per_task={t: _stats(rs) for t, rs in by_task.items()}, total=_stats(list(results)))


# --------------------------------------------------------------------------- scoring


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _to_reward(value: Any) -> float:
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"reward must be a number, got {type(value).__name__} {value!r:.80}")
    r = float(value)  # numpy scalars, bools, ints; TypeError for anything else
    if not math.isfinite(r):
        raise ValueError(f"reward must be finite, got {r}")
    return r


def _call_with_timeout(
    fn: Callable[..., Any], args: tuple, timeout_s: float | None, name: str
) -> tuple[Any, str | None, bool]:
    """Run ``fn(*args)``; returns (value, error, timed_out). Never raises (except KeyboardInterrupt)."""
    if timeout_s is None:  # inline, no thread (debugging / main-thread-only libraries)
        try:
            return fn(*args), None, False
        except Exception as e:  # noqa: BLE001
            return None, _err(e), False

    fut: concurrent.futures.Future = concurrent.futures.Future()

    def target() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  (SystemExit from a reward must not escape)
            fut.set_exception(e if isinstance(e, Exception) else RuntimeError(_err(e)))

    th = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    th.start()
    try:
        return fut.result(timeout=max(float(timeout_s), 0.0)), None, False
    except concurrent.futures.TimeoutError:
        with _LOCK:
            _ABANDONED.append(th)
        return None, f"timed out after {timeout_s:g}s", True
    except Exception as e:  # noqa: BLE001
        return None, _err(e), False


def abandoned_threads() -> int:
    """How many timed-out reward threads are still running in the background."""
    with _LOCK:
        _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()]
        return len(_ABANDONED)


def score(record: dict, response: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> RewardResult:
    """Reward of `response` for `record` via the function registered for ``record["task"]``.

    Never raises: unknown task, a raising reward, a bad return value or a timeout give reward 0.0
    with `error` set. ``timeout_s=None`` runs inline without a timeout.
    """
    task = _task_of(record)
    if task == MISSING_TASK:
        return RewardResult(0.0, f"record has no string 'task' field: {str(record)[:120]}", False)
    try:
        fn = get(task)
    except KeyError as e:
        return RewardResult(0.0, _err(e), False)
    value, error, timed_out = _call_with_timeout(fn, (record, response), timeout_s, task)
    if error is not None:
        return RewardResult(0.0, error, timed_out)
    try:
        return RewardResult(_to_reward(value))
    except Exception as e:  # noqa: BLE001
        return RewardResult(0.0, _err(e), False)


def _score_group(
    task: str, batch_fn: BatchRewardFn, records: list[dict], responses: list[str], timeout_s: float | None
) -> list[RewardResult]:
    value, error, timed_out = _call_with_timeout(batch_fn, (records, responses), timeout_s, task)
    if error is None:
        try:
            value = list(value)
            if len(value) != len(records):
                raise ValueError(f"batch reward returned {len(value)} values for {len(records)} inputs")
        except Exception as e:  # noqa: BLE001
            error = _err(e)
    if error is not None:
        return [RewardResult(0.0, error, timed_out) for _ in records]
    out = []
    for v in value:
        try:
            out.append(RewardResult(_to_reward(v)))
        except Exception as e:  # noqa: BLE001
            out.append(RewardResult(0.0, _err(e), False))
    return out


def score_batch(
    records: Sequence[dict],
    responses: Sequence[str],
    *,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    batch_timeout_s: float | None = DEFAULT_BATCH_TIMEOUT_S,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> tuple[list[RewardResult], RewardStats]:
    """Score ``responses[i]`` against ``records[i]``; returns (results in input order, stats).

    Per-item rewards run with `timeout_s` each, up to `max_workers` at a time (threads: useful for
    rewards that wait on subprocesses or devices; CPU-bound Python rewards share the GIL). Tasks with
    a batch function are scored by one call per task with `batch_timeout_s`.
    Raises only for mismatched lengths.
    """
    records = list(records)
    responses = list(responses)
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    results: list[RewardResult | None] = [None] * len(records)

    groups: dict[str, list[int]] = {}
    singles: list[int] = []
    for i, rec in enumerate(records):
        task = _task_of(rec)
        if task != MISSING_TASK and get_batch(task) is not None:
            groups.setdefault(task, []).append(i)
        else:
            singles.append(i)

    jobs: list[Callable[[], None]] = []
    for task, idxs in groups.items():

        def run_group(task=task, idxs=idxs) -> None:
            fn = get_batch(task)
            res = _score_group(task, fn, [records[i] for i in idxs], [responses[i] for i in idxs], batch_timeout_s)
            for i, r in zip(idxs, res):
                results[i] = r

        jobs.append(run_group)
    for i in singles:

        def run_one(i=i) -> None:
            results[i] = score(records[i], responses[i], timeout_s)

        jobs.append(run_one)

    if max_workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
    else:
        # Each job is bounded by its timeout (score never hangs), so joining this pool cannot hang.
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(max_workers, len(jobs))) as ex:
            for f in [ex.submit(job) for job in jobs]:
                f.result()

    final = [r if r is not None else RewardResult(0.0, "internal error: not scored", False) for r in results]
    return final, summarize(records, final)
