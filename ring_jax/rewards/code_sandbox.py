"""Run untrusted Python programs (model responses) in a sandbox, for the "code" reward.

``run_python(source, stdin, limits)`` starts ``_sandbox_child.py`` (the launcher) in a new session and process
group, with a scrubbed environment (PATH, LANG/LC_ALL, PYTHONHASHSEED=0, ...; HOME = the program's cwd; none of
the caller's variables), stdin from an unlinked temporary file, and stdout/stderr captured through pipes with a
byte cap.  The launcher sets up the isolation, then the program runs as ``__main__`` of a fresh interpreter
(this one's binary, ``-S -P -B -X utf8``: no site-packages, no cwd on sys.path; exit()/quit() still work).

Isolation, strongest available first (``SandboxResult.isolation`` lists what took effect):

* namespaces, as root (the normal case on our machines):
  - network namespace: only a down loopback, so no connection leaves the sandbox (not even to the host's
    127.0.0.1) and abstract unix sockets are private;
  - mount namespace: every host mount remounted read-only, fresh size-limited tmpfs on /tmp (the program's
    cwd = HOME = /tmp/work), /var/tmp, /run/lock and /dev/shm, a private /proc: nothing on the host
    filesystem can be written or deleted, and the host's temp files are invisible;
  - pid namespace: the program cannot see or signal any host process (the trainer included); when the
    namespace's init exits (after the program's main process exits, or when we SIGKILL it on timeout) the
    kernel kills every process left in it, daemonised grandchildren included, before we return;
  - ipc/uts namespaces: SysV IPC objects cannot outlive the run;
  - a per-run unprivileged uid/gid (``UID_BASE + slot``, slots flock'ed machine-wide; no supplementary
    groups), no capabilities (empty bounding set, no_new_privs): RLIMIT_NPROC counts only this run's
    processes, and the program cannot signal anything outside its namespace or read other users' files
    (e.g. ``/proc/<pid>/environ``).  The interpreter's prefix is bind-mounted at its own path if it lies
    below a directory the uid cannot enter (pyenv under /root);
  - rlimits: CPU seconds (SIGXCPU, then SIGKILL a second later), address space (memory_mb: allocations
    beyond it raise MemoryError), file size (EFBIG), processes+threads, open files, no core dumps; plus a
    wall-clock deadline enforced by the parent.
* namespaces, not root: the same, in a new user namespace (the program is that namespace's root, mapped
  onto the caller's uid, with no capabilities), when unprivileged user namespaces are enabled.
* plain (namespaces unavailable, or ``isolation="plain"``): rlimits, new session, scrubbed environment,
  throw-away cwd, the per-run uid when root, the launcher as a child subreaper that kills and reaps every
  descendant at the end, and an audit-hook prelude that refuses sockets, signals, exec/subprocess, ctypes,
  /proc of other processes and writes outside the cwd.  The audit hook is best effort only (C code can
  bypass it); without root the program also keeps the caller's uid, so it could, in principle, signal the
  caller or escape the cleanup.

Not covered: memory is limited per process (a forking program can use up to max_procs * memory_mb, plus
3 * tmpfs_mb of tmpfs); world-readable host files stay readable; no seccomp filter (kernel attack surface).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")

UID_BASE = 2_100_000_000  # per-run uids/gids: UID_BASE + slot (not in /etc/passwd; only used while a run lasts)
N_SLOTS = 256
# uid-slot locks (root only); one fixed path so that every process on the machine shares them
_LOCK_DIR = "/run/ring_jax_sandbox_uids" if os.path.isdir("/run") else "/tmp/ring_jax_sandbox_uids"
_KILL = shutil.which("kill", path="/bin:/usr/bin")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not the program's fault)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    cpu_s: float = 5.0
    wall_s: float = 10.0
    memory_mb: int = 512  # address space per process
    file_size_mb: int = 8  # largest file the program may write
    max_procs: int = 16  # processes + threads of the run's uid (main process included)
    max_output_bytes: int = 1 << 20  # per stream; the run is killed when stdout or stderr exceeds it
    tmpfs_mb: int = 64  # size of each scratch tmpfs (/tmp incl. the cwd, /var/tmp, /dev/shm)
    max_open_files: int = 256


@dataclasses.dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int | None  # like subprocess: negative = killed by that signal
    timed_out: bool  # wall-clock limit hit
    killed_reason: str | None  # wall_timeout | cpu_limit | memory | file_size | output_limit | signal:NAME | None
    wall_s: float
    truncated: bool = False
    cpu_s: float | None = None
    isolation: tuple[str, ...] = ()  # the mechanisms that took effect, see the module docstring
    sandbox_uid: int | None = None
    warnings: tuple[str, ...] = ()  # non-fatal set-up problems (e.g. a mount that could not be made read-only)


# ---------------------------------------------------------------- per-run uid slots (root only)


def _lock_dir() -> str:
    try:
        os.mkdir(_LOCK_DIR, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(_LOCK_DIR)
    if not os.path.isdir(_LOCK_DIR) or os.path.islink(_LOCK_DIR) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise SandboxError(f"unsafe sandbox lock directory {_LOCK_DIR}")
    return _LOCK_DIR


def _acquire_slot() -> tuple[int, int]:
    """(slot, fd holding an exclusive flock) -- exclusive across threads and processes on this machine."""
    d = _lock_dir()
    for slot in range(N_SLOTS):
        fd = os.open(os.path.join(d, f"{slot}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return slot, fd
        except BlockingIOError:
            os.close(fd)
    raise SandboxError("all sandbox uid slots are busy")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (kill(-1) run as that uid; the kernel does it atomically)."""
    if _KILL is None:
        return
    try:
        subprocess.run(
            [_KILL, "-9", "-1"],
            user=uid,
            group=uid,
            extra_groups=[],
            env={},
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        pass


# ---------------------------------------------------------------- running


def _env() -> dict[str, str]:
    # Nothing from the parent's environment; HOME/TMPDIR are set by the child to its cwd and /tmp.
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def run_python(
    source: str, stdin: str = "", limits: SandboxLimits = SandboxLimits(), *, isolation: str = "auto"
) -> SandboxResult:
    """Run `source` as a Python program in the sandbox, feeding it `stdin`.  Never raises for anything the
    program does; raises SandboxError only if the sandbox cannot be set up.  `isolation`: "auto" (namespaces
    when possible, else plain) or "plain" (testing the fallback)."""
    if isolation not in ("auto", "plain"):
        raise ValueError(f"unknown isolation {isolation!r}")
    t0 = time.monotonic()
    slot_fd = uid = workdir = proc = out = None
    status_r = status_w = -1
    try:
        if os.geteuid() == 0:
            slot, slot_fd = _acquire_slot()
            uid = UID_BASE + slot
        workdir = tempfile.mkdtemp(prefix="ring_jax_sbx_")
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        status_r, status_w = os.pipe()
        cfg = {
            "status_fd": status_w,
            "parent_pid": os.getpid(),
            "isolation": isolation,
            "workdir": workdir,
            "program": os.path.join(workdir, "main.py"),
            "interpreter": os.path.realpath(sys.executable),
            "interpreter_prefix": os.path.realpath(sys.base_prefix),
            "uid": uid,
            "gid": uid,
            "env": _env(),
            "tmpfs_mb": limits.tmpfs_mb,
            "limits": {
                "cpu_s": max(1, int(round(limits.cpu_s))),
                "memory_mb": limits.memory_mb,
                "file_size_mb": limits.file_size_mb,
                "max_procs": limits.max_procs,
                "max_open_files": limits.max_open_files,
            },
        }
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8", "replace"))
            stdin_file.seek(0)
            proc = subprocess.Popen(
                [os.path.realpath(sys.executable), "-I", "-S", _CHILD, marshal.dumps(cfg).hex()],
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(status_w,),
                close_fds=True,
                start_new_session=True,
                env=_env(),
                cwd=workdir,
            )
        os.close(status_w)
        status_w = -1
        out = _collect(proc, status_r, limits, t0)
    finally:
        if proc is not None:
            _kill_group(proc)
        for fd in (status_w, status_r):
            if fd >= 0:
                os.close(fd)
        if uid is not None and (out is None or "pidns" not in out.isolation):
            _kill_uid(uid)  # plain mode: also catch processes that left the process group
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if slot_fd is not None:
            os.close(slot_fd)  # releases the uid slot
    out.sandbox_uid = uid
    out.wall_s = time.monotonic() - t0
    return out


def _exited(proc: subprocess.Popen) -> bool:
    """Has the launcher exited?  Does not reap it, so its pid (= our process group id) cannot be reused."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_group(proc: subprocess.Popen, status: dict | None = None) -> None:
    """Kill everything the run started, then reap the launcher.

    Namespaced runs: SIGKILL the pid namespace's init; the kernel then kills every process in the namespace, and
    the launcher (which waits for init) exits only once the namespace is empty.  Plain runs: SIGTERM the
    launcher, which kills and reaps all its descendants.  Then, as a backstop, SIGKILL the process group --
    before reaping the launcher, so that the group id cannot have been reused.
    """
    status = status or {}
    if not _exited(proc):
        try:
            if status.get("init_pid"):
                os.kill(status["init_pid"], signal.SIGKILL)
            elif "plain" in status.get("isolation", ()):
                os.kill(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + 5.0
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.002)
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _parse_status(buf: bytes) -> dict:
    status: dict = {}
    for line in buf.decode("utf-8", "replace").splitlines():
        try:
            status.update(json.loads(line))
        except json.JSONDecodeError:
            pass
    return status


def _collect(proc: subprocess.Popen, status_r: int, limits: SandboxLimits, t0: float) -> SandboxResult:
    cap = limits.max_output_bytes
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    status_buf = bytearray()
    sel = selectors.DefaultSelector()
    for fd in (out_fd, err_fd, status_r):
        sel.register(fd, selectors.EVENT_READ)
    deadline = t0 + limits.wall_s
    timed_out = truncated = False
    killed_reason = None
    exited_at = None
    while sel.get_map() and killed_reason is None:
        now = time.monotonic()
        if exited_at is None and _exited(proc):
            exited_at = now
        # Once the launcher has exited everything is dead (namespaces) or orphaned (plain mode): only drain
        # what is buffered, briefly, in case some orphan holds the pipes open.
        limit_t = deadline if exited_at is None else min(deadline, exited_at + 0.5)
        if now >= limit_t:
            if exited_at is None:
                timed_out, killed_reason = True, "wall_timeout"
            break
        # short select timeout while running: the launcher's exit is polled, not signalled
        for key, _ in sel.select(timeout=min(limit_t - now, 0.05)):
            try:
                data = os.read(key.fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fd)
            elif key.fd == status_r:
                status_buf += data
            else:
                buf = bufs[key.fd]
                room = cap - len(buf)
                buf += data[: max(room, 0)]
                if len(data) > room:
                    truncated, killed_reason = True, "output_limit"
    sel.close()
    os.set_blocking(status_r, False)
    try:  # pick up status lines not read yet
        while chunk := os.read(status_r, 1 << 16):
            status_buf += chunk
    except (BlockingIOError, OSError):
        pass
    status = _parse_status(bytes(status_buf))
    _kill_group(proc, status)
    try:  # whatever init reported while being killed
        while chunk := os.read(status_r, 1 << 16):
            status_buf += chunk
    except (BlockingIOError, OSError):
        pass
    status = _parse_status(bytes(status_buf))
    if "exit_status" not in status:
        if "error" in status:
            raise SandboxError(status["error"])
        if "isolation" not in status:  # the launcher died (or was killed) before the program started
            tail = bufs[err_fd][-2000:].decode("utf-8", "replace")
            raise SandboxError(f"sandbox set-up failed (launcher exit {proc.returncode}, {killed_reason}): {tail}")

    if "exit_status" in status:
        returncode = os.waitstatus_to_exitcode(status["exit_status"])
    elif killed_reason is not None:  # we killed it before it finished
        returncode = -signal.SIGKILL
    else:
        returncode = proc.returncode
    if killed_reason is None and returncode is not None and returncode < 0:
        sig = -returncode
        killed_reason = {
            signal.SIGXCPU: "cpu_limit",
            signal.SIGXFSZ: "file_size",
        }.get(sig, f"signal:{_signal_name(sig)}")
        if sig == signal.SIGKILL and (status.get("cpu_s") or 0.0) >= limits.cpu_s:
            killed_reason = "cpu_limit"
    stderr = bufs[err_fd].decode("utf-8", "replace")
    if killed_reason is None and returncode and "MemoryError" in stderr[-4096:]:
        killed_reason = "memory"
    return SandboxResult(
        stdout=bufs[out_fd].decode("utf-8", "replace"),
        stderr=stderr,
        returncode=returncode,
        timed_out=timed_out,
        killed_reason=killed_reason,
        wall_s=time.monotonic() - t0,
        truncated=truncated,
        cpu_s=status.get("cpu_s"),
        isolation=tuple(status.get("isolation", ())),
        warnings=tuple(status.get("warnings", ())),
    )
