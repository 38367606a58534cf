"""Launcher that runs *inside* the sandbox process tree (see code_sandbox.py for the design).

It is executed as a script by the parent (``python -I -S _sandbox_child.py CONFIG``), still with the
parent's privileges, and imports nothing but a few cheap standard-library modules (start-up time matters).  Its job:

1. enter fresh namespaces (network, mount, pid, ipc, uts; plus a user namespace when not root),
2. fork the namespace's init (pid 1), which makes the whole filesystem read-only, puts empty size-limited
   tmpfs on /tmp, /var/tmp and /dev/shm (the program's working directory lives in that /tmp), mounts a
   private /proc, and reaps children; when it exits the kernel SIGKILLs everything left in the pid namespace,
3. fork the worker, which sets the rlimits, drops every capability and (as root) switches to the sandbox's
   own unprivileged uid/gid, then execs the interpreter on the program.

If namespaces are unavailable it degrades to "plain" mode: rlimits, the unprivileged uid when root, itself as
a child subreaper that kills and reaps all descendants, and an audit-hook prelude (best effort only).
Progress is reported as JSON lines on the status fd (init_pid, isolation, exit_status/cpu_s, or error).
"""

import ctypes
import marshal
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
_MOUNT_OPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

WORK_IN_NS = "/tmp/work"  # the program's cwd/HOME inside the mount namespace

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception):
    pass


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option, arg2=0):
    _check(_libc.prctl(option, arg2, 0, 0, 0), f"prctl {option}")


def _json(obj):
    """Minimal JSON encoder (importing json costs ~10 ms of start-up, mostly for `re`)."""
    if obj is None or isinstance(obj, bool):
        return {None: "null", True: "true", False: "false"}[obj]
    if isinstance(obj, (int, float)):
        return repr(obj)
    if isinstance(obj, str):
        return '"' + "".join(c if c >= " " and c not in '"\\' else f"\\u{ord(c):04x}" for c in obj) + '"'
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_json(x) for x in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ",".join(_json(str(k)) + ":" + _json(v) for k, v in obj.items()) + "}"
    return _json(str(obj))


class Status:
    """JSON lines to the parent on an inherited pipe (closed on exec, so the program never holds it)."""

    def __init__(self, fd: int):
        self.fd = fd

    def send(self, **msg: object) -> None:
        try:
            os.write(self.fd, (_json(msg) + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


# ---------------------------------------------------------------- mount namespace set-up (init, as root)


def _unescape_mountinfo(s):
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _mounts():
    """(mount point, per-mount flags) of every mount in this namespace, outermost first."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            flags = 0
            for opt in fields[5].split(","):
                flags |= _MOUNT_OPT_FLAGS.get(opt, 0)
            res.append((_unescape_mountinfo(fields[4]), flags))
    res.sort(key=lambda m: m[0].count("/") if m[0] != "/" else 0)
    return res


def _others_can_reach(path):
    """True when a user who is neither owner nor in the group can traverse to `path` and read/exec it."""
    path = os.path.realpath(path)
    parts = path.split("/")
    for i in range(2, len(parts)):
        st = os.stat("/".join(parts[:i]) or "/")
        if not st.st_mode & 0o001:
            return False
    st = os.stat(path)
    return bool(st.st_mode & 0o005 == 0o005)


def _first_closed_ancestor(path):
    parts = os.path.realpath(path).split("/")
    for i in range(2, len(parts) + 1):
        d = "/".join(parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _setup_filesystem(cfg, uid, gid):
    """Private, read-only view of the host filesystem with fresh writable tmpfs scratch areas."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    with open(cfg["program"], "rb") as f:  # read before /tmp is hidden
        program = f.read()
    failures = []
    for mp, flags in _mounts():
        try:
            _mount(None, mp, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)
        except SetupError as e:
            if mp == "/":
                raise
            failures.append(str(e))
    size = f"size={int(cfg['tmpfs_mb'])}m,nr_inodes=16384"
    opts = MS_NOSUID | MS_NODEV
    _mount("tmpfs", "/tmp", "tmpfs", opts, f"{size},mode=1777")
    for d in ("/dev/shm", "/var/tmp", "/run/lock"):
        if os.path.isdir(d) and not os.path.islink(d):
            try:
                _mount("tmpfs", d, "tmpfs", opts, f"{size},mode=1777")
            except SetupError as e:
                failures.append(str(e))

    # The interpreter may sit below a directory the sandbox uid cannot enter (e.g. pyenv in /root, 0700).
    # Hide that directory behind a read-only tmpfs that contains only the interpreter's prefix, at its
    # original path (the binary's RUNPATH is absolute).
    exe = cfg["interpreter"]
    if uid is not None and not _others_can_reach(exe):
        prefix = os.path.realpath(cfg["interpreter_prefix"])
        closed = _first_closed_ancestor(prefix)
        if closed is None or closed == prefix or not os.path.realpath(exe).startswith(prefix + "/"):
            raise SetupError(f"interpreter {exe} is not reachable by the sandbox uid")
        stage = "/tmp/.interpreter_stage"
        os.mkdir(stage, 0o755)
        _mount(prefix, stage, None, MS_BIND | MS_REC)
        _mount("tmpfs", closed, "tmpfs", opts, "size=1m,mode=755")
        os.makedirs(prefix, 0o755)
        _mount(stage, prefix, None, MS_MOVE)
        _mount(None, prefix, None, MS_BIND | MS_REMOUNT | MS_RDONLY | opts)
        _mount(None, closed, None, MS_REMOUNT | MS_RDONLY | opts, "mode=755")
        os.rmdir(stage)
        if not _others_can_reach(exe):
            raise SetupError(f"interpreter {exe} is still not reachable by the sandbox uid")

    try:  # a /proc that only shows this pid namespace
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except SetupError as e:
        failures.append(str(e))

    os.mkdir(WORK_IN_NS, 0o700)
    main = os.path.join(WORK_IN_NS, "main.py")
    with open(main, "wb") as f:
        f.write(program)
    if uid is not None:
        os.chown(WORK_IN_NS, uid, gid)
        os.chown(main, uid, gid)
    return failures


# ---------------------------------------------------------------- worker (becomes the program)


def _set_limits(lim):
    def setl(res, soft, hard=None):
        resource.setrlimit(res, (soft, soft if hard is None else hard))

    setl(resource.RLIMIT_CPU, int(lim["cpu_s"]), int(lim["cpu_s"]) + 1)  # SIGXCPU, then SIGKILL
    setl(resource.RLIMIT_AS, int(lim["memory_mb"]) << 20)
    setl(resource.RLIMIT_FSIZE, int(lim["file_size_mb"]) << 20)
    setl(resource.RLIMIT_NPROC, int(lim["max_procs"]))
    setl(resource.RLIMIT_NOFILE, int(lim["max_open_files"]))
    setl(resource.RLIMIT_CORE, 0)


def _drop_privileges(uid, gid):
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binaries / file capabilities after exec
    try:
        last_cap = int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        last_cap = 63
    for cap in range(last_cap + 1):  # empty bounding set: execve cannot grant capabilities, even to uid 0
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() not in (22,):  # EINVAL
            break  # no CAP_SETPCAP (unprivileged, plain mode): nothing to drop anyway
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise SetupError("failed to switch to the sandbox uid")


# The program runs as __main__ of an interpreter started with -S (no site: ~35 ms faster, no site-packages),
# so the two builtins that site would add are provided here.
_RUN_MAIN = r"""
import builtins as _b, sys as _s
_b.exit = _b.quit = _s.exit
_s.argv = ["main.py"]
with open("main.py", "rb") as _f:
    _code = compile(_f.read(), "main.py", "exec")
__file__ = "main.py"
del _b, _s, _f
exec(_code)
"""


def _exec_program(cfg, uid, gid, cwd, prelude, status):
    try:
        _set_limits(cfg["limits"])
        _drop_privileges(uid, gid)
        os.chdir(cwd)
        os.set_inheritable(status.fd, False)  # closed by execve
        exe = cfg["interpreter"]
        argv = [exe, "-S", "-P", "-B", "-X", "utf8", "-c", prelude + _RUN_MAIN]
        os.execve(exe, argv, cfg["env"] | {"HOME": cwd, "TMPDIR": "/tmp"})
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        status.send(error=f"worker: {type(e).__name__}: {e}")
        os._exit(125)


# ---------------------------------------------------------------- modes


def _run_namespaced(cfg, status, user_ns):
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if user_ns:
        flags |= CLONE_NEWUSER
    ruid, rgid = os.getuid(), os.getgid()
    if _libc.unshare(flags) != 0:
        return ctypes.get_errno()
    if user_ns:  # become root of the new user namespace (mapped onto our own uid outside)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"0 {ruid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"0 {rgid} 1")
    uid = None if user_ns else cfg["uid"]
    gid = None if user_ns else cfg["gid"]

    init_pid = os.fork()
    if init_pid == 0:  # pid 1 of the new pid namespace
        code = 125
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            try:
                _libc.sethostname(b"sandbox", 7)
            except Exception:  # noqa: BLE001
                pass
            failures = _setup_filesystem(cfg, uid, gid)
            status.send(
                isolation=["netns", "mountns-readonly-fs", "pidns", "ipcns"]
                + (["userns"] if user_ns else ["uid"])
                + ["rlimits", "no-caps"],
                warnings=failures,
            )
            worker = os.fork()
            if worker == 0:
                _exec_program(cfg, uid, gid, WORK_IN_NS, "", status)
            while True:  # reap everything; stop when the program itself is done
                pid, st, ru = os.wait4(-1, 0)
                if pid == worker:
                    status.send(exit_status=st, cpu_s=ru.ru_utime + ru.ru_stime)
                    code = 0
                    break
        except BaseException as e:  # noqa: BLE001
            status.send(error=f"init: {type(e).__name__}: {e}")
        os._exit(code)  # the kernel now SIGKILLs whatever is left in the pid namespace
    status.send(init_pid=init_pid)  # host pid: the parent SIGKILLs it on timeout
    _, st = os.waitpid(init_pid, 0)  # returns only once every process of the pid namespace is gone
    os._exit(os.waitstatus_to_exitcode(st) & 0xFF if os.WIFEXITED(st) else 125)


_AUDIT_PRELUDE = r"""
def _install():
    import os, sys
    cwd = os.path.realpath(os.getcwd())
    me = str(os.getpid())
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def inside(p):
        try:
            p = os.path.realpath(os.fsdecode(p))
        except Exception:
            return False
        return p == cwd or p.startswith(cwd + os.sep)
    def deny(event):
        raise PermissionError(f"sandbox: {event} is not allowed")
    PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                   "os.link", "os.truncate", "os.utime", "os.mkfifo", "os.mknod", "shutil.rmtree",
                   "shutil.copyfile", "shutil.move"}
    EXEC_EVENTS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen", "pty.spawn",
                   "os.startfile", "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata",
                   "ctypes.call_function", "ctypes.addressof", "os.setuid", "os.setgid"}
    def hook(event, args):
        if event.startswith("socket.") or event in EXEC_EVENTS:
            deny(event)
        if event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event == "os.kill" and args and args[0] == os.getpid():
                return
            deny(event)
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            writing = (flags & W) or any(c in mode for c in "wax+")
            if writing and not inside(path):
                deny("writing " + path)
            real = os.path.realpath(path)
            if real.startswith("/proc/") and not real.startswith(("/proc/self", "/proc/" + me)):
                deny("reading " + path)
        elif event in PATH_EVENTS:
            for a in args:
                if isinstance(a, (str, bytes)) and not inside(a):
                    deny(event)
    sys.addaudithook(hook)
_install()
del _install
"""


def _pick_plain_interpreter(cfg, uid):
    if uid is None:
        return cfg["interpreter"]
    for cand in [cfg["interpreter"], "/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]:
        try:
            if _others_can_reach(cand):
                return os.path.realpath(cand)
        except OSError:
            pass
    raise SetupError("no Python interpreter is reachable by the sandbox uid (plain mode)")


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop


def _children():
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:  # kernel without CONFIG_PROC_CHILDREN: scan /proc
        kids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            kids.append(int(name))
                except (OSError, ValueError, IndexError):
                    pass
        return kids


def _kill_descendants(uid):
    """SIGKILL and reap every descendant.  We are a child subreaper, so orphans are re-parented to us."""
    if uid is not None:  # kill(-1) as the sandbox uid: every process of that uid, atomically
        pid = os.fork()
        if pid == 0:
            try:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
    while True:
        for kid in _children():
            try:
                os.kill(kid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _run_plain(cfg, status, reasons):
    """No namespaces: rlimits + own uid (when root) + audit-hook prelude.  Best effort, see the module doc.

    This process stays as a child subreaper above the program: when the program exits, or on SIGTERM from
    the parent (timeout), it kills and reaps every descendant (including ones that called setsid)."""
    uid, gid = (cfg["uid"], cfg["gid"]) if os.geteuid() == 0 else (None, None)
    work = cfg["workdir"]
    try:
        cfg["interpreter"] = _pick_plain_interpreter(cfg, uid)
        if uid is not None:
            for name in ("", "main.py"):
                os.chown(os.path.join(work, name), uid, gid)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    except BaseException as e:  # noqa: BLE001
        status.send(error=f"plain: {type(e).__name__}: {e}")
        os._exit(125)
    status.send(
        isolation=["plain", "audit-hook"] + (["uid"] if uid is not None else []) + ["rlimits"], warnings=reasons
    )
    signal.signal(signal.SIGTERM, _raise_stop)
    worker = os.fork()
    if worker == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _exec_program(cfg, uid, gid, work, _AUDIT_PRELUDE, status)
    try:
        while True:
            pid, st, ru = os.wait4(-1, 0)
            if pid == worker:
                status.send(exit_status=st, cpu_s=ru.ru_utime + ru.ru_stime)
                break
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _kill_descendants(uid)
    os._exit(0)


def main() -> None:  # never returns (every path ends in os._exit); NoReturn would import typing here
    cfg = marshal.loads(bytes.fromhex(sys.argv[1]))  # written by our parent
    status = Status(cfg["status_fd"])
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except SetupError:
        pass
    if os.getppid() != cfg["parent_pid"]:
        os._exit(125)
    reasons = []
    if cfg["isolation"] == "auto":
        err = _run_namespaced(cfg, status, user_ns=os.geteuid() != 0)  # returns only if unshare failed
        reasons.append(f"namespaces unavailable: {os.strerror(err)}")
    _run_plain(cfg, status, reasons)


if __name__ == "__main__":
    main()
