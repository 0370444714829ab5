"""Run untrusted Python programs (a model's generated code and its tests) in a separate, limited process.

Never ``exec`` in the training process: each program runs in a fresh ``python -I -S`` child (isolated mode, no site
packages) with a cleared environment, its own temporary working directory (removed afterwards), stdin closed,
stdout/stderr into size-capped files, and a wall-clock timeout after which its whole process group is killed. Before
the program's first line, a bootstrap inside the child

1. when the parent is root: enters new namespaces where the kernel allows it — network (no interface but a down
   loopback: nothing can be reached), mount (private tmpfs over the world-writable ``/tmp``, ``/var/tmp``,
   ``/dev/shm``) and PID (the program is the namespace's init: when it exits, everything it started is killed);
   as a non-root user it tries a user + network namespace instead;
2. sets hard resource limits: CPU seconds, address space, file size, open files, processes, no core files;
3. when root: drops to an unprivileged uid/gid (``nobody``, supplementary groups cleared) — root ignores
   ``RLIMIT_NPROC`` and may write anywhere — and asks for SIGKILL should its parent die;
4. without a network namespace: installs an audit hook that refuses every ``socket.*`` event. This is a weaker
   guard (code that reaches libc through ``ctypes`` bypasses it); :meth:`Sandbox.capabilities` says which is active.

The result comes back as data (:class:`SandboxResult`), with the error's traceback restricted to the program's own
frames (as LeTI's executor does), which is the text a feedback loop shows the model. The interpreter must be
readable by the unprivileged user: ``interpreter=None`` picks the running one when its install is world-readable,
else ``/usr/bin/python3``; with neither the uid is not dropped, and :meth:`Sandbox.capabilities` says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lit_ft.core.validate import check_int, check_number

__all__ = ["STATUSES", "Sandbox", "SandboxResult"]

#: what a run can end as: exit 0 / an AssertionError (a test failed) / another exception or a non-zero exit /
#: past the wall-clock or CPU limit / killed by a signal (memory, file size, ...)
STATUSES = ("passed", "failed", "error", "timeout", "killed")

_UNPRIVILEGED = 65534  # nobody / nogroup on Debian and most distributions
_REPORT_FD = 3  # the bootstrap's report channel (a file the parent opened): caps, exception, signal

# The code the child runs before the program. It reads its settings from argv[1] (JSON) and the program from
# ./program.py. Kept free of non-stdlib imports; everything it imports is imported before the uid is dropped.
_BOOTSTRAP = r'''
import sys, os, json, resource, signal, traceback, ctypes, ctypes.util
cfg = json.loads(sys.argv[1])
rep = os.fdopen(cfg["report_fd"], "w", buffering=1)
def report(**kw):
    rep.write(json.dumps(kw) + "\n")
caps = {"network": "none", "private_tmp": False, "pid_namespace": False, "uid": os.geteuid(), "nproc_enforced": False,
        "cpu_limit": cfg["cpu"]}
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 16384, 1 << 18, 2, 4
libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
def unshare(flags):
    return libc.unshare(ctypes.c_int(flags)) == 0
root = os.geteuid() == 0
if cfg["namespaces"]:
    if root:
        if unshare(CLONE_NEWNET):
            caps["network"] = "namespace"
        if unshare(CLONE_NEWNS) and libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) == 0:
            ok = True
            for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
                if os.path.isdir(d) and libc.mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV,
                                                   b"size=%dk,mode=1777" % cfg["tmp_kb"]) != 0:
                    ok = False
            caps["private_tmp"] = ok
        caps["pid_namespace"] = unshare(CLONE_NEWPID)
    elif unshare(CLONE_NEWUSER | CLONE_NEWNET):
        caps["network"] = "namespace"
if caps["network"] != "namespace" and cfg["audit_network"]:
    def _refuse_network(event, args):
        if event.startswith("socket."):
            raise PermissionError(f"network access is disabled in this sandbox ({event})")
    sys.addaudithook(_refuse_network)
    caps["network"] = "audit_hook"
def limit(kind, value):
    resource.setrlimit(kind, (value, value))
limit(resource.RLIMIT_CORE, 0)
# the soft CPU limit sends SIGXCPU (ignored by a PID namespace's init), the hard one SIGKILL one second later
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu"], cfg["cpu"] + 1))
limit(resource.RLIMIT_AS, cfg["as_bytes"])
limit(resource.RLIMIT_FSIZE, cfg["fsize_bytes"])
limit(resource.RLIMIT_NOFILE, cfg["nofile"])
if caps["pid_namespace"]:
    pid = os.fork()
    if pid:  # the waiter outside the namespace: relay how the program ended
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            report(signal=os.WTERMSIG(status))
            os._exit(128 + os.WTERMSIG(status))
        os._exit(os.WEXITSTATUS(status))
if root and cfg["drop_to"] is not None:
    os.setgroups([])
    os.setgid(cfg["drop_to"])
    os.setuid(cfg["drop_to"])
    caps["uid"] = os.geteuid()
    try:
        os.setuid(0)
        caps["uid"] = 0  # pragma: no cover - regaining root must fail
    except PermissionError:
        pass
if os.geteuid() != 0:
    limit(resource.RLIMIT_NPROC, cfg["nproc"])
    caps["nproc_enforced"] = True
libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the waiter (set after the uid change clears it)
report(caps=caps)
with open("program.py", encoding="utf-8") as f:
    src = f.read()
del cfg, f, libc, unshare, limit
g = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    exec(compile(src, "<string>", "exec"), g)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)
except BaseException as e:
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<string>":
        tb = tb.tb_next  # the program's own frames only (the bootstrap's are noise to a model)
    # the authors' layout: the header, the program's frames (none for a SyntaxError), the exception
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(traceback.extract_tb(tb)))
    text += "".join(traceback.format_exception_only(type(e), e))
    try:
        report(exception=type(e).__name__, traceback=text)
    except BaseException:
        pass
    sys.stderr.write(text)
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(1)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended, as data.

    Attributes:
        status: one of :data:`STATUSES`.
        returncode: the process's exit code (``None`` when it was killed by a signal or timed out).
        signal: the signal that ended it (``SIGKILL`` after a timeout, ``SIGXFSZ``, ...), else ``None``.
        exception: the type name of the exception that ended the program, else ``None``.
        traceback: that exception's traceback over the program's own frames (``""`` when none).
        error: one line for feedback: the exception's last line, ``"timeout"`` or ``"killed by <signal>"``.
        stdout / stderr: the last ``output_limit`` characters of each.
        wall_seconds / cpu_seconds: elapsed wall time and the children's CPU time.
        capabilities: what the bootstrap enforced for this run (see :meth:`Sandbox.capabilities`).
    """

    status: str
    returncode: int | None
    signal: int | None
    exception: str | None
    traceback: str
    error: str
    stdout: str
    stderr: str
    wall_seconds: float
    cpu_seconds: float
    capabilities: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _world_traversable(path: Path) -> bool:
    """Every directory above ``path`` can be entered by others and ``path`` itself read (mode bits)."""
    try:
        if not os.stat(path).st_mode & 0o004:
            return False
        return all(os.stat(p).st_mode & 0o001 for p in path.parents)
    except OSError:
        return False


def _pick_interpreter() -> tuple[str, bool]:
    """An interpreter the unprivileged user can run, and whether one was found (else the running one)."""
    candidates = [Path(os.path.realpath(sys.executable)), Path(os.path.realpath("/usr/bin/python3"))]
    for exe in candidates:
        stdlib = exe.parent.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
        if not exe.is_file():
            continue
        if exe == candidates[0]:
            import sysconfig

            stdlib = Path(sysconfig.get_paths()["stdlib"])
        else:  # the system interpreter's own version, which may differ from ours
            found = [d for d in sorted(exe.parent.parent.glob("lib/python3.*")) if (d / "os.py").is_file()]
            stdlib = found[0] if found else stdlib
        if _world_traversable(exe) and stdlib.is_dir() and _world_traversable(stdlib / "os.py"):
            return str(exe), True
    return sys.executable, False


class Sandbox:
    """Run Python source in a limited child process and return a :class:`SandboxResult`.

    Args:
        cpu_seconds: ``RLIMIT_CPU`` of the program (SIGXCPU at the soft limit, SIGKILL one second later).
        wall_seconds: wall-clock limit; past it the process group is killed (``status="timeout"``). LeTI's executor
            uses 5 s.
        memory_mb: ``RLIMIT_AS`` (address space) in MiB; a program past it gets ``MemoryError``.
        file_size_mb: ``RLIMIT_FSIZE`` in MiB: the largest file it may write, its stdout/stderr included.
        max_processes: ``RLIMIT_NPROC`` of the unprivileged uid (enforced only when not running as root).
        max_open_files: ``RLIMIT_NOFILE``.
        output_limit: characters kept from the end of stdout and of stderr.
        namespaces: try network / mount / PID namespaces (see the module docstring).
        audit_network: without a network namespace, refuse ``socket.*`` audit events (a weaker guard).
        interpreter: the Python that runs programs; ``None`` = the running one when the unprivileged user can read
            it, else ``/usr/bin/python3``.
    """

    def __init__(self, cpu_seconds: int = 5, wall_seconds: float = 10.0, memory_mb: int = 1024,
                 file_size_mb: int = 16, max_processes: int = 64, max_open_files: int = 64,
                 output_limit: int = 4096, namespaces: bool = True, audit_network: bool = True,
                 interpreter: str | None = None) -> None:
        owner = type(self).__name__
        if sys.platform != "linux":
            raise RuntimeError(f"{owner} needs Linux (resource limits, namespaces); this is {sys.platform}")
        self.cpu_seconds = check_int(owner, "cpu_seconds", cpu_seconds, 1)
        self.wall_seconds = check_number(owner, "wall_seconds", wall_seconds, 0.0, low_open=True)
        self.memory_mb = check_int(owner, "memory_mb", memory_mb, 64)
        self.file_size_mb = check_int(owner, "file_size_mb", file_size_mb, 1)
        self.max_processes = check_int(owner, "max_processes", max_processes, 1)
        self.max_open_files = check_int(owner, "max_open_files", max_open_files, 16)
        self.output_limit = check_int(owner, "output_limit", output_limit, 0)
        self.namespaces, self.audit_network = bool(namespaces), bool(audit_network)
        if interpreter is None:
            self.interpreter, readable = _pick_interpreter()
        else:
            self.interpreter, readable = interpreter, True
        # drop to nobody only where we are root and the interpreter is readable by nobody
        self._drop_to = _UNPRIVILEGED if (os.geteuid() == 0 and readable) else None
        if os.geteuid() == 0 and self._drop_to is None:
            warnings.warn(f"{owner}: running as root and no interpreter is readable by uid {_UNPRIVILEGED} (pass "
                          "`interpreter`): programs run as root, without the process-count and file-permission "
                          "guards", RuntimeWarning, stacklevel=2)
        self._caps: dict[str, Any] | None = None

    def capabilities(self) -> dict[str, Any]:
        """What is enforced here, probed once with an empty program: ``network`` (``"namespace"``: no reachable
        interface; ``"audit_hook"``: ``socket.*`` events refused in Python only; ``"none"``), ``private_tmp``
        (world-writable directories are private tmpfs mounts), ``pid_namespace`` (everything the program starts
        dies with it), ``uid`` (the program's uid: 0 means root, no file-permission or process-count guard),
        ``nproc_enforced``, the resource limits, and ``interpreter``."""
        if self._caps is None:
            probe = self.run("pass")
            self._caps = {**probe.capabilities, "interpreter": self.interpreter, "cpu_seconds": self.cpu_seconds,
                          "wall_seconds": self.wall_seconds, "memory_mb": self.memory_mb,
                          "file_size_mb": self.file_size_mb, "max_processes": self.max_processes,
                          "max_open_files": self.max_open_files}
        return dict(self._caps)

    def _config(self) -> dict[str, Any]:
        return {"report_fd": _REPORT_FD, "namespaces": self.namespaces, "audit_network": self.audit_network,
                "cpu": self.cpu_seconds, "as_bytes": self.memory_mb << 20, "fsize_bytes": self.file_size_mb << 20,
                "nofile": self.max_open_files, "nproc": self.max_processes, "drop_to": self._drop_to,
                "tmp_kb": max(1024, self.file_size_mb << 10)}

    def run(self, program: str) -> SandboxResult:
        """Run ``program`` (Python source) and return how it ended. Nothing it starts outlives this call."""
        if not isinstance(program, str):
            raise TypeError(f"Sandbox.run: `program` must be Python source as a str, got {type(program).__name__}")
        workdir = tempfile.mkdtemp(prefix="lit_ft_sandbox_")
        try:
            Path(workdir, "program.py").write_text(program, encoding="utf-8")
            if self._drop_to is not None:
                for p in (workdir, os.path.join(workdir, "program.py")):
                    os.chown(p, self._drop_to, self._drop_to)
            return self._run_in(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _run_in(self, workdir: str) -> SandboxResult:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as rep:
            os.set_inheritable(rep.fileno(), True)
            # the report file must be fd 3 in the child: dup it there via pass_fds' numbering trick
            start = time.monotonic()
            proc = subprocess.Popen(
                [self.interpreter, "-I", "-S", "-c", f"import os; os.dup2({rep.fileno()}, {_REPORT_FD}); "
                 + "exec(compile(" + repr(_BOOTSTRAP) + ", '<bootstrap>', 'exec'))", json.dumps(self._config())],
                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                pass_fds=(rep.fileno(),), start_new_session=True)
            timed_out, status, cpu = False, None, 0.0
            try:
                while status is None:  # wait4, not Popen.wait: the child's own CPU time, even with threads around
                    pid, st, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        status, cpu = st, usage.ru_utime + usage.ru_stime
                    elif time.monotonic() - start > self.wall_seconds:
                        timed_out = True
                        break
                    else:
                        time.sleep(0.005)
            finally:
                _kill_group(proc.pid)  # always: a program that exits may leave children in its group
                if status is None:
                    _, status, usage = os.wait4(proc.pid, 0)
                    cpu = usage.ru_utime + usage.ru_stime
                proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
            wall = time.monotonic() - start
            stdout, stderr = _tail(out, self.output_limit), _tail(err, self.output_limit)
            reports = _read_reports(rep)
        return _classify(proc.returncode, timed_out, reports, stdout, stderr, wall, cpu)

    def run_many(self, programs: Sequence[str], workers: int = 1, desc: str = "executing programs") -> list[SandboxResult]:
        """:meth:`run` over ``programs`` with ``workers`` in parallel, in order, with a progress bar."""
        from lit_ft.core.progress import progress

        workers = check_int(type(self).__name__, "workers", workers, 1)
        if workers == 1:
            return [self.run(p) for p in progress(programs, desc, total=len(programs), unit="program")]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(progress(pool.map(self.run, programs), desc, total=len(programs), unit="program"))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f, limit: int) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * limit))  # bytes; decoded then cut to `limit` characters
    text = f.read().decode("utf-8", errors="replace")
    return text[-limit:] if limit else ""


def _read_reports(f) -> dict[str, Any]:
    f.seek(0)
    merged: dict[str, Any] = {}
    for line in f.read().decode("utf-8", errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue  # the program may write to the channel too; only its own result can suffer
        if isinstance(item, dict):
            for k, v in item.items():
                merged.setdefault(k, v) if k == "caps" else merged.__setitem__(k, v)
    return merged


def _classify(returncode: int, timed_out: bool, reports: dict[str, Any], stdout: str, stderr: str, wall: float,
              cpu: float) -> SandboxResult:
    caps = reports.get("caps") if isinstance(reports.get("caps"), dict) else {}
    sig = reports.get("signal") if isinstance(reports.get("signal"), int) else None
    if returncode < 0:
        sig = -returncode
    exception = reports.get("exception") if isinstance(reports.get("exception"), str) else None
    tb = reports.get("traceback") if isinstance(reports.get("traceback"), str) else ""
    rc = None if (sig is not None or timed_out) else returncode
    if timed_out or sig in (signal.SIGXCPU,) or (sig == signal.SIGKILL and cpu >= 0 and _cpu_bound(caps, cpu)):
        status, error = "timeout", "timeout"
    elif sig is not None:
        status, error = "killed", f"killed by {signal.Signals(sig).name}"
    elif returncode == 0:
        status, error = "passed", ""
    elif exception == "AssertionError":
        status, error = "failed", _last_line(tb) or "AssertionError"
    else:
        status = "error"
        error = _last_line(tb) or _last_line(stderr) or f"exited with code {returncode}"
    return SandboxResult(status, rc, sig if not timed_out else signal.SIGKILL, exception, tb, error, stdout, stderr,
                         wall, cpu, caps)


def _cpu_bound(caps: dict[str, Any], cpu: float) -> bool:
    """SIGKILL at the hard CPU limit (the soft one's SIGXCPU is ignored by a PID namespace's init)."""
    limit = caps.get("cpu_limit")
    return isinstance(limit, (int, float)) and cpu >= limit


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""
