"""Reward registry: lookup, crash/timeout safety, batch scoring and statistics."""

import math
import os
import subprocess
import sys
import threading
import time

import pytest

import ring_jax.rewards  # noqa: F401  (registers the built-in tasks)
from ring_jax.rewards import registry
from ring_jax.rewards.registry import RewardResult, score, score_batch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tasks():
    """Register throw-away tasks for one test and remove them afterwards."""
    names = []
    release = threading.Event()

    def add(name, fn, batch=False):
        (registry.register_batch if batch else registry.register)(name)(fn)
        names.append(name)

    add.release = release
    yield add
    release.set()  # let any "hung" reward thread finish
    for n in names:
        registry.unregister(n)


def test_builtin_tasks_registered():
    tasks = registry.list_tasks()
    for t in ["math", "countdown", "sudoku", "maze", "arc", "arithmetic", "ifeval", "reward_model"]:
        assert t in tasks
    assert tasks == sorted(tasks)


def test_register_get_unregister(tasks):
    def fn(record, response):
        return 1.0

    tasks("t_reg", fn)
    assert registry.get("t_reg") is fn
    assert "t_reg" in registry.list_tasks()
    with pytest.raises(ValueError, match="already registered"):
        registry.register("t_reg")(fn)
    registry.register("t_reg", overwrite=True)(lambda r, s: 0.5)
    assert registry.get("t_reg")({}, "") == 0.5
    registry.unregister("t_reg")
    assert "t_reg" not in registry.list_tasks()


def test_unknown_task_keyerror_names_known():
    with pytest.raises(KeyError) as ei:
        registry.get("no_such_task")
    msg = str(ei.value)
    assert "no_such_task" in msg and "math" in msg and "countdown" in msg


def test_score_ok_and_coerces(tasks):
    tasks("t_ok", lambda r, s: len(s) > 2)  # bool -> float
    res = score({"task": "t_ok"}, "abcd")
    assert res == RewardResult(1.0, None, False) and res.ok
    assert isinstance(res.reward, float)


def test_score_never_raises(tasks):
    def boom(record, response):
        raise ZeroDivisionError("kaboom")

    def bye(record, response):
        raise SystemExit(3)

    tasks("t_boom", boom)
    tasks("t_nan", lambda r, s: math.nan)
    tasks("t_str", lambda r, s: "1.0")
    tasks("t_exit", bye)
    res = score({"task": "t_boom"}, "x")
    assert res.reward == 0.0 and not res.timed_out and "ZeroDivisionError" in res.error and "kaboom" in res.error
    assert "finite" in score({"task": "t_nan"}, "x").error
    assert score({"task": "t_str"}, "x").error is not None
    assert score({"task": "t_exit"}, "x").error is not None
    unknown = score({"task": "nope"}, "x")
    assert unknown.reward == 0.0 and "nope" in unknown.error and "math" in unknown.error
    assert score({"prompt": "no task"}, "x").error is not None
    assert score("not a dict", "x").error is not None
    # inline mode (no thread) has the same contract
    assert "kaboom" in score({"task": "t_boom"}, "x", timeout_s=None).error


def test_slow_reward_times_out_without_hanging(tasks):
    def hang(record, response):
        tasks.release.wait(30)
        return 1.0

    tasks("t_hang", hang)
    t0 = time.perf_counter()
    res = score({"task": "t_hang"}, "x", timeout_s=0.2)
    assert time.perf_counter() - t0 < 2.0
    assert res.reward == 0.0 and res.timed_out and "timed out" in res.error
    assert registry.abandoned_threads() >= 1
    tasks.release.set()
    deadline = time.time() + 5
    while registry.abandoned_threads() and time.time() < deadline:
        time.sleep(0.01)
    assert registry.abandoned_threads() == 0


def test_score_batch_results_and_stats(tasks):
    def hang(record, response):
        tasks.release.wait(30)
        return 1.0

    def boom(record, response):
        raise RuntimeError("bad")

    tasks("t_val", lambda r, s: float(s))
    tasks("t_hang2", hang)
    tasks("t_boom2", boom)
    records = [{"task": "t_val"}] * 4 + [{"task": "t_hang2"}, {"task": "t_boom2"}, {"task": "t_boom2"}]
    responses = ["1.0", "0.0", "0.75", "0.5", "x", "x", "x"]
    results, stats = score_batch(records, responses, timeout_s=0.3, max_workers=4)
    assert [r.reward for r in results] == [1.0, 0.0, 0.75, 0.5, 0.0, 0.0, 0.0]
    assert results[4].timed_out and results[5].error and not results[5].timed_out

    v = stats.per_task["t_val"]
    assert (v.count, v.n_errors, v.n_timeouts) == (4, 0, 0)
    assert v.mean_reward == pytest.approx(2.25 / 4)
    assert v.pass_rate == pytest.approx(0.5)  # 1.0 and 0.75 pass; 0.5 is not > 0.5
    h, b = stats.per_task["t_hang2"], stats.per_task["t_boom2"]
    assert (h.count, h.n_timeouts, h.n_errors, h.mean_reward) == (1, 1, 0, 0.0)
    assert (b.count, b.n_timeouts, b.n_errors, b.pass_rate) == (2, 0, 2, 0.0)
    tot = stats.total
    assert (tot.count, tot.n_errors, tot.n_timeouts) == (7, 2, 1)
    assert tot.mean_reward == pytest.approx(2.25 / 7)
    assert tot.pass_rate == pytest.approx(2 / 7)
    d = stats.to_dict()
    assert d["reward/all/count"] == 7.0 and d["reward/t_val/pass_rate"] == pytest.approx(0.5)
    assert d["reward/t_hang2/n_timeouts"] == 1.0

    # sequential path gives the same rewards
    seq, _ = score_batch(records[:4], responses[:4], max_workers=1)
    assert [r.reward for r in seq] == [1.0, 0.0, 0.75, 0.5]


def test_score_batch_validation_and_empty():
    with pytest.raises(ValueError):
        score_batch([{"task": "math"}], [])
    results, stats = score_batch([], [])
    assert results == [] and stats.total.count == 0 and stats.per_task == {}


def test_batch_reward_called_once(tasks):
    calls = []

    def batch(records, responses):
        calls.append(len(records))
        return [float(len(s)) for s in responses]

    tasks("t_batch", batch, batch=True)
    tasks("t_badbatch", lambda recs, resps: [1.0], batch=True)
    records = [{"task": "t_batch"}, {"task": "t_badbatch"}, {"task": "t_batch"}, {"task": "t_badbatch"}]
    results, stats = score_batch(records, ["ab", "x", "abc", "y"])
    assert calls == [2]
    assert results[0].reward == 2.0 and results[2].reward == 3.0
    assert results[1].error and "2 inputs" in results[1].error and results[3].reward == 0.0
    assert stats.per_task["t_badbatch"].n_errors == 2
    # per-item lookup of a batch-only task wraps the batch function
    assert registry.get("t_batch")({"task": "t_batch"}, "abcd") == 4.0
    assert score({"task": "t_batch"}, "abcde").reward == 5.0


def test_package_import_is_plain_python():
    """ring_jax.rewards must not pull in jax/flax/ring_jax.model (nor the heavy scorers eagerly)."""
    code = (
        "import sys, ring_jax.rewards\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax') or m.startswith('ring_jax.model')]\n"
        "assert not bad, bad\n"
        "assert 'reasoning_gym' not in sys.modules and 'math_verify' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, timeout=60)


def test_warmup_runs():
    ring_jax.rewards.warmup()  # imports math-verify + reasoning-gym; must not raise
