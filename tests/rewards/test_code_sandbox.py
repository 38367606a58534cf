"""The code reward and its sandbox, against hostile programs.

Every hostile test asserts the real outcome on the host (files, listeners, processes, this process being
alive), not only what the sandboxed program reports.  Runs that are "plain" exercise the no-namespace
fallback (rlimits + audit hook + per-run uid when root).
"""

import os
import signal
import socket
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

import ring_jax.rewards  # noqa: F401  (registers the built-in tasks)
from ring_jax.rewards import registry
from ring_jax.rewards.code import code_reward, code_reward_stats, extract_program
from ring_jax.rewards.code_sandbox import N_SLOTS, UID_BASE, SandboxLimits, run_python

IS_ROOT = os.geteuid() == 0
FAST = SandboxLimits(cpu_s=2, wall_s=2)
ISOLATIONS = ["auto", "plain"]


def _src(code: str) -> str:
    return textwrap.dedent(code).lstrip()


def _response(code: str) -> str:
    return f"<think>let me write ```python\nprint('draft')\n``` first</think>Here it is:\n```python\n{_src(code)}```\n"


def _sandbox_processes() -> list[tuple[int, str]]:
    """(pid, state) of every process running as one of the sandbox's per-run uids."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                st = f.read()
        except OSError:
            continue
        uid = int(st.split("Uid:", 1)[1].split()[0])
        if UID_BASE <= uid < UID_BASE + N_SLOTS:
            found.append((int(name), st.split("State:", 1)[1].split()[0]))
    return found


def _assert_no_leftovers(res):
    if res.sandbox_uid is None:  # not root: no per-run uid to look for (the pid namespace covers it)
        assert "pidns" in res.isolation or "plain" in res.isolation
        return
    assert _sandbox_processes() == []


# ---------------------------------------------------------------- the reward


SUM_RECORD = {
    "task": "code",
    "prompt": "Read two integers and print their sum and product on two lines.",
    "tests": [
        {"input": "1 2\n", "output": "3\n2\n"},
        {"input": "5 7\n", "output": "12\n35"},
        {"input": "-3 3", "output": "0\n-9\n"},
    ],
}
SUM_OK = """
    a, b = map(int, input().split())
    print(a + b)
    print(a * b, "   ")
"""


def test_correct_program_scores_1():
    assert code_reward(SUM_RECORD, _response(SUM_OK)) == 1.0


def test_wrong_answer_scores_0():
    wrong_on_last = """
        a, b = map(int, input().split())
        print(a + b)
        print(a * b if a > 0 else 0)
    """
    assert code_reward(SUM_RECORD, _response(wrong_on_last)) == 0.0
    assert code_reward(SUM_RECORD, _response("print(3)\nprint(2)\n")) == 0.0


def test_crash_or_nonzero_exit_scores_0():
    assert code_reward(SUM_RECORD, _response(SUM_OK + "raise SystemExit(1)\n")) == 0.0
    assert code_reward(SUM_RECORD, _response(SUM_OK + "1/0\n")) == 0.0


def test_no_code_block_scores_0():
    before = code_reward_stats().get("no_code", 0)
    assert code_reward(SUM_RECORD, "a, b = map(int, input().split())\nprint(a + b)") == 0.0
    assert code_reward(SUM_RECORD, "<think>```python\nprint(1)\n```</think> no code, sorry") == 0.0
    assert code_reward_stats()["no_code"] == before + 2


def test_extract_program():
    assert extract_program("x\n```python\na=1\n```\ny\n```python\nb=2\n```\n") == "b=2\n"
    assert extract_program("```python\na=1\n```\n```\nplain\n```") == "a=1\n"  # python block preferred
    assert extract_program("```\nplain\n```") == "plain\n"
    assert extract_program("```py\n  x = 1\n```") == "  x = 1\n"
    assert extract_program("<think>```python\nthought\n```</think>```python3\nfinal\n```") == "final\n"
    assert extract_program("```python\nunterminated") is None
    assert extract_program("no code") is None


def test_tests_code_with_entry_point():
    rec = {
        "task": "code",
        "tests_code": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
        "entry_point": "add",
    }
    assert code_reward(rec, _response("def add(a, b):\n    return a + b\n")) == 1.0
    assert code_reward(rec, _response("def add(a, b):\n    return a - b\n")) == 0.0
    asserts = {"task": "code", "tests_code": "assert add(1, 1) == 2"}
    assert code_reward(asserts, _response("def add(a, b):\n    return a + b\n")) == 1.0
    assert code_reward(asserts, _response("def add(a, b):\n    return 3\n")) == 0.0


@pytest.mark.parametrize(
    "exit_call", ["exit(0)", "import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"]
)
def test_exiting_before_the_asserts_scores_0(exit_call):
    rec = {
        "task": "code",
        "tests_code": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
        "entry_point": "add",
    }
    assert code_reward(rec, _response(f"def add(a, b):\n    return 0\n{exit_call}\n")) == 0.0


def test_total_time_budget():
    rec = {"task": "code", "tests": [{"input": "", "output": "ok"}] * 6}
    before = code_reward_stats().get("timeouts", 0)
    t0 = time.monotonic()
    assert code_reward(rec, _response("import time\ntime.sleep(0.5)\nprint('ok')\n")) == 1.0
    assert code_reward(rec, _response("import time\ntime.sleep(0.5)\nprint('ok')\n"), total_s=0.8) == 0.0
    assert code_reward_stats()["timeouts"] == before + 1
    assert time.monotonic() - t0 < 5


def test_registry_dispatch_and_broken_record_is_counted():
    res = registry.score(SUM_RECORD, _response(SUM_OK), timeout_s=30)
    assert res.ok and res.reward == 1.0
    before = code_reward_stats().get("errors", 0)
    assert code_reward({"task": "code", "prompt": "no tests"}, _response(SUM_OK)) == 0.0
    assert code_reward({"task": "code", "tests": "{not json"}, _response(SUM_OK)) == 0.0
    assert code_reward_stats()["errors"] == before + 2


def test_broken_sandbox_raises_and_reward_counts_error(monkeypatch):
    import ring_jax.rewards.code_sandbox as cs

    monkeypatch.setattr(cs, "_CHILD", "/nonexistent/launcher.py")
    with pytest.raises(cs.SandboxError):
        cs.run_python("print(1)")
    before = code_reward_stats().get("errors", 0)
    assert code_reward(SUM_RECORD, _response(SUM_OK)) == 0.0
    assert code_reward_stats()["errors"] == before + 1


def test_infinite_loop_times_out_and_scores_0():
    rec = {"task": "code", "tests": [{"input": "", "output": "1"}]}
    before = code_reward_stats().get("timeouts", 0)
    t0 = time.monotonic()
    assert code_reward(rec, _response("while True:\n    pass\n"), SandboxLimits(cpu_s=10, wall_s=1.5)) == 0.0
    assert time.monotonic() - t0 < 1.5 + 1.5
    assert code_reward_stats()["timeouts"] == before + 1

    res = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)\n", limits=SandboxLimits(wall_s=1))
    assert res.timed_out and res.killed_reason == "wall_timeout" and res.returncode == -signal.SIGKILL
    assert res.stdout == "started\n"
    assert 1.0 <= res.wall_s < 2.5
    _assert_no_leftovers(res)


def test_cpu_limit():
    res = run_python("while True:\n    pass\n", limits=SandboxLimits(cpu_s=1, wall_s=10))
    assert not res.timed_out and res.killed_reason == "cpu_limit"
    assert res.wall_s < 4


# ---------------------------------------------------------------- hostile programs


@pytest.mark.parametrize(
    "alloc", ["x = bytearray(4 * 1024**3)", "xs = []\nwhile True:\n    xs.append(bytearray(50 << 20))"]
)
def test_memory_hog_is_stopped(alloc):
    res = run_python(alloc + "\nprint('allocated')\n", limits=SandboxLimits(memory_mb=256, wall_s=5))
    assert res.returncode != 0 and res.killed_reason == "memory", res
    assert "allocated" not in res.stdout
    assert res.wall_s < 4


def test_fork_bomb_is_contained():
    bomb = """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """
    res = run_python(_src(bomb), limits=SandboxLimits(cpu_s=2, wall_s=2, max_procs=16))
    assert res.timed_out and res.wall_s < 4
    if "pidns" not in res.isolation:
        pytest.skip(f"no pid namespace here ({res.isolation}); fork bomb containment not asserted")
    _assert_no_leftovers(res)
    # the raw bomb (dies of EAGAIN) as well, and the machine still runs programs
    res = run_python("import os\nwhile True:\n    os.fork()\n", limits=SandboxLimits(cpu_s=2, wall_s=2, max_procs=16))
    assert res.returncode != 0 and "Resource temporarily unavailable" in res.stderr
    _assert_no_leftovers(res)
    assert run_python("print('ok')").stdout == "ok\n"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_daemonised_grandchild_is_killed(isolation):
    if isolation == "plain" and not IS_ROOT:
        pytest.skip("plain mode without root cannot reliably kill escaped processes (documented)")
    prog = """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        print('parent done')
    """
    res = run_python(_src(prog), limits=FAST, isolation=isolation)
    assert res.stdout == "parent done\n" and res.returncode == 0
    assert res.wall_s < 1.5
    _assert_no_leftovers(res)


@pytest.fixture
def outside_dirs():
    """World-writable directories outside the sandbox, each with a sentinel file (removed afterwards)."""
    dirs = []
    for base in (tempfile.gettempdir(), "/run"):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            d = os.path.join(base, f"ring_jax_sbx_test_{uuid.uuid4().hex}")
            os.mkdir(d)
            os.chmod(d, 0o777)
            with open(os.path.join(d, "sentinel"), "w") as f:
                f.write("keep me")
            os.chmod(os.path.join(d, "sentinel"), 0o666)
            dirs.append(d)
    yield dirs
    import shutil

    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_cannot_write_or_delete_outside_its_directory(isolation, outside_dirs):
    if isolation == "plain" and not IS_ROOT:
        pytest.skip("plain mode without root: only the (best-effort) audit hook guards the filesystem")
    stray = [f"{d}_stray" for d in outside_dirs]
    prog = f"""
        import os, shutil
        def attempt(name, fn):
            try:
                fn()
                print(name, "ok")
            except Exception as e:
                print(name, type(e).__name__)
        for d, stray in zip({outside_dirs!r}, {stray!r}):
            attempt("create", lambda: open(os.path.join(d, "new.txt"), "w").write("x"))
            attempt("delete", lambda: os.remove(os.path.join(d, "sentinel")))
            attempt("overwrite", lambda: open(os.path.join(d, "sentinel"), "w").write("gone"))
            attempt("rmtree", lambda: shutil.rmtree(d))
            attempt("stray", lambda: open(stray, "w").write("x"))
        attempt("own_dir", lambda: open("mine.txt", "w").write("fine"))
        print(open("mine.txt").read())
    """
    res = run_python(_src(prog), limits=FAST, isolation=isolation)
    assert res.returncode == 0, res
    assert "own_dir ok" in res.stdout and "fine" in res.stdout  # the sandbox is usable
    for d, s in zip(outside_dirs, stray):
        assert sorted(os.listdir(d)) == ["sentinel"]
        with open(os.path.join(d, "sentinel")) as f:
            assert f.read() == "keep me"
        assert not os.path.exists(s)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_network(isolation):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(8)
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        prog = f"""
            import socket
            for kind in ("tcp", "udp", "dns"):
                try:
                    if kind == "tcp":
                        socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=0.5).sendall(b"hi")
                    elif kind == "udp":
                        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                            b"hi", ("127.0.0.1", {udp.getsockname()[1]}))
                    else:
                        socket.getaddrinfo("pypi.org", 443)
                    print(kind, "sent")
                except Exception as e:
                    print(kind, type(e).__name__)
        """
        res = run_python(_src(prog), limits=FAST, isolation=isolation)
        assert res.returncode == 0, res
        assert "tcp sent" not in res.stdout and "udp sent" not in res.stdout and "dns sent" not in res.stdout
        time.sleep(0.05)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    finally:
        tcp.close()
        udp.close()


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_cannot_read_parent_environment(isolation, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("RING_JAX_TEST_SECRET", secret)
    prog = f"""
        import os
        print(dict(os.environ))
        for pid in ("1", str(os.getppid()), "{os.getpid()}", "self"):
            try:
                print(pid, open(f"/proc/{{pid}}/environ", "rb").read())
            except Exception as e:
                print(pid, type(e).__name__)
    """
    res = run_python(_src(prog), limits=FAST, isolation=isolation)
    assert "HOME" in res.stdout  # it did print its own environment
    assert secret not in res.stdout and secret not in res.stderr
    assert "RING_JAX_TEST_SECRET" not in res.stdout


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_cannot_kill_its_parent(isolation):
    if isolation == "plain" and not IS_ROOT:
        pytest.skip("plain mode without root runs the program as our own uid: kill(-1) would be unsafe")
    me = os.getpid()
    prog = f"""
        import os, signal
        for name, fn in [
            ("ppid", lambda: os.kill(os.getppid(), signal.SIGKILL)),
            ("pytest", lambda: os.kill({me}, signal.SIGKILL)),
            ("pytest_group", lambda: os.killpg(os.getpgid({me}), signal.SIGKILL)),
            ("init", lambda: os.kill(1, signal.SIGKILL)),
            ("everyone", lambda: os.kill(-1, signal.SIGKILL)),
            ("own_group", lambda: os.killpg(0, signal.SIGKILL)),
        ]:
            try:
                fn()
                print(name, "sent", flush=True)
            except Exception as e:
                print(name, type(e).__name__, flush=True)
    """
    res = run_python(_src(prog), limits=FAST, isolation=isolation)
    assert os.getpid() == me  # still here
    assert "pytest sent" not in res.stdout and "pytest_group sent" not in res.stdout
    assert run_python("print('alive')", isolation=isolation).stdout == "alive\n"


def test_huge_output_is_truncated():
    lim = SandboxLimits(wall_s=5, max_output_bytes=100_000)
    res = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=lim)
    assert res.truncated and res.killed_reason == "output_limit" and len(res.stdout) == 100_000
    assert res.wall_s < 2
    res = run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 65536)\n", limits=lim)
    assert res.truncated and len(res.stderr) == 100_000 and res.stdout == ""
    _assert_no_leftovers(res)


def test_file_size_limit():
    prog = """
        with open("big.bin", "wb") as f:
            for _ in range(20):
                f.write(b"\\0" * (1 << 20))
        print("wrote 20 MB")
    """
    res = run_python(_src(prog), limits=SandboxLimits(file_size_mb=8, wall_s=5))
    assert res.returncode != 0 and "wrote 20 MB" not in res.stdout
    assert "File too large" in res.stderr or res.killed_reason == "file_size", res
    small = run_python(_src(prog.replace("range(20)", "range(2)")), limits=SandboxLimits(file_size_mb=8))
    assert small.returncode == 0 and small.stdout == "wrote 20 MB\n"


def test_concurrent_runs_get_separate_uids():
    results = [None, None]

    def go(i):
        results[i] = run_python("import os, time\ntime.sleep(0.3)\nprint(os.getuid())", limits=FAST)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results)
    if IS_ROOT:
        uids = {r.sandbox_uid for r in results}
        assert len(uids) == 2 and {int(r.stdout) for r in results} == uids


_UNPRIVILEGED_CALLER = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("code_sandbox", sys.argv[1])
cs = importlib.util.module_from_spec(spec)
sys.modules["code_sandbox"] = cs
spec.loader.exec_module(cs)
prog = '''
import os, socket
for name, fn in [("write", lambda: open(os.path.join(%r, "new.txt"), "w")),
                 ("delete", lambda: os.remove(os.path.join(%r, "sentinel"))),
                 ("kill", lambda: os.kill(%d, 9)),
                 ("connect", lambda: socket.create_connection(("127.0.0.1", %d), timeout=0.5))]:
    try:
        fn()
        print(name, "ok")
    except Exception as e:
        print(name, type(e).__name__)
''' % (sys.argv[2], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
r = cs.run_python(prog, limits=cs.SandboxLimits(wall_s=5))
print(json.dumps({"stdout": r.stdout, "stderr": r.stderr, "isolation": r.isolation, "rc": r.returncode}))
"""


@pytest.mark.skipif(not IS_ROOT, reason="needs root to start an unprivileged caller")
def test_unprivileged_caller(outside_dirs):
    """The non-root path (user namespace when available, else plain), called by uid 65534."""
    import json
    import subprocess

    py = "/usr/bin/python3"
    module = os.path.join(os.path.dirname(ring_jax.rewards.__file__), "code_sandbox.py")
    if (
        not os.path.exists(py)
        or subprocess.run([py, "-c", "pass"], user=65534, group=65534, extra_groups=[], cwd="/").returncode
    ):
        pytest.skip("no interpreter usable by uid 65534")
    d = outside_dirs[0]
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    tcp.setblocking(False)
    try:
        out = subprocess.run(
            [py, "-I", "-c", _UNPRIVILEGED_CALLER, module, d, str(os.getpid()), str(tcp.getsockname()[1])],
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["rc"] == 0, res
        assert "write ok" not in res["stdout"] and "delete ok" not in res["stdout"]
        assert "kill ok" not in res["stdout"] and "connect ok" not in res["stdout"]
        assert sorted(os.listdir(d)) == ["sentinel"]
        with pytest.raises(BlockingIOError):
            tcp.accept()
        if "userns" not in res["isolation"]:
            pytest.skip(f"unprivileged user namespaces unavailable; plain mode was used ({res['isolation']})")
    finally:
        tcp.close()
