"""The sandbox contains hostile programs and reports each as data; nothing it starts or writes outlives a run.

Limits are small (1 s CPU, 2 s wall) so the suite stays quick. Where a guard depends on the machine (root, kernel
namespaces), the test reads :meth:`Sandbox.capabilities` and checks what it claims — never more.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lit_ft.core.sandbox import STATUSES, Sandbox, SandboxResult

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the sandbox needs Linux")


@pytest.fixture(scope="module", params=[True, False], ids=["namespaces", "no_namespaces"])
def sandbox(request) -> Sandbox:
    """With the kernel namespaces where available, and without them (what a machine that refuses unshare gets)."""
    return Sandbox(cpu_seconds=1, wall_seconds=2.0, memory_mb=256, file_size_mb=1, max_processes=32,
                   namespaces=request.param)


@pytest.fixture(scope="module")
def caps(sandbox: Sandbox) -> dict:
    return sandbox.capabilities()


def _ours() -> set[int]:
    """Live processes running a sandbox interpreter with our bootstrap (whatever their uid)."""
    found = set()
    for cmd in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            text = Path(cmd).read_bytes()
        except OSError:
            continue
        if b"<bootstrap>" in text:
            found.add(int(cmd.split("/")[2]))
    return found


@pytest.fixture
def clean(sandbox: Sandbox):
    """Every test leaves no sandbox process and no sandbox working directory behind."""
    before_dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "lit_ft_sandbox_*")))
    yield
    deadline = time.monotonic() + 2.0
    while _ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _ours(), f"sandbox processes left behind: {_ours()}"
    after = set(glob.glob(os.path.join(tempfile.gettempdir(), "lit_ft_sandbox_*"))) - before_dirs
    assert not after, f"sandbox working directories left behind: {after}"


def test_a_passing_program(sandbox, clean):
    r = sandbox.run("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')\n")
    assert isinstance(r, SandboxResult)
    assert (r.status, r.returncode, r.signal, r.exception, r.error) == ("passed", 0, None, None, "")
    assert r.stdout == "ok\n" and r.passed
    assert r.wall_seconds < 2.0 and r.status in STATUSES


def test_a_failing_program_reports_its_own_frames(sandbox, clean):
    r = sandbox.run("def f(x):\n    return x\n\ndef check(c):\n    assert c(1) == 2, 'wrong'\n\ncheck(f)\n")
    assert (r.status, r.returncode, r.exception) == ("failed", 1, "AssertionError")
    assert r.error == "AssertionError: wrong"
    assert r.traceback == ('Traceback (most recent call last):\n'
                           '  File "<string>", line 7, in <module>\n'
                           '  File "<string>", line 5, in check\n'
                           'AssertionError: wrong\n')
    assert "<bootstrap>" not in r.traceback  # the harness's frames are not the model's business


def test_a_syntax_error_and_a_runtime_error_are_errors(sandbox, clean):
    r = sandbox.run("def f(:\n    pass\n")
    assert (r.status, r.exception) == ("error", "SyntaxError") and r.error.startswith("SyntaxError")
    assert r.traceback.startswith("Traceback (most recent call last):\n")
    r = sandbox.run("x = undefined_name\n")
    assert (r.status, r.error) == ("error", "NameError: name 'undefined_name' is not defined")


def test_an_infinite_loop_is_stopped(sandbox, clean):
    r = sandbox.run("while True:\n    pass\n")
    assert r.status == "timeout" and r.error == "timeout" and r.returncode is None
    assert r.wall_seconds < 4.0


def test_a_sleeping_program_hits_the_wall_clock(sandbox, clean):
    r = sandbox.run("import time\ntime.sleep(60)\n")
    assert r.status == "timeout" and 1.9 < r.wall_seconds < 4.0
    assert r.cpu_seconds < 1.0  # no CPU used: the wall clock, not RLIMIT_CPU, stopped it


def test_a_fork_bomb_is_contained(sandbox, caps, clean):
    if not caps["nproc_enforced"]:  # root without a uid drop: nothing would bound it but the wall clock
        pytest.skip("RLIMIT_NPROC is not enforced here (root and no readable interpreter for uid 65534)")
    r = sandbox.run("import os\nwhile True:\n    os.fork()\n")
    assert r.status == "error" and "BlockingIOError" in r.error, r
    assert r.wall_seconds < 4.0


def test_a_memory_bomb_gets_memory_error(sandbox, clean):
    r = sandbox.run("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n")
    assert (r.status, r.exception) == ("error", "MemoryError")
    r = sandbox.run("x = bytearray(10**10)\n")
    assert r.error == "MemoryError"


def test_output_is_capped_by_the_file_size_limit(sandbox, clean):
    r = sandbox.run("print('x' * 10**7)\n")  # 10 MB > file_size_mb=1
    assert r.status == "error" and "File too large" in r.error
    assert len(r.stdout) <= 4096


def test_writing_outside_its_directory_is_refused_or_private(sandbox, caps, clean, tmp_path):
    target = tmp_path / "escaped.txt"  # the parent's directory (under /tmp: hidden by the private tmpfs, if any)
    system = Path(f"/etc/lit_ft_escape_{os.getpid()}")  # root-owned, not world-writable
    try:
        r = sandbox.run(f"open({str(target)!r}, 'w').write('x')\n")
        r2 = sandbox.run(f"open({str(system)!r}, 'w').write('x')\n")
        if caps["uid"] != 0:
            assert (r.status, r.exception) in (("error", "PermissionError"), ("error", "FileNotFoundError")), r
            assert (r2.status, r2.exception) == ("error", "PermissionError"), r2
            assert not target.exists() and not system.exists()
    finally:
        system.unlink(missing_ok=True)
    # world-writable /tmp: a private tmpfs when the mount namespace is there
    name = f"lit_ft_escape_{os.getpid()}"
    r = sandbox.run(f"open('/tmp/{name}', 'w').write('x')\nopen('inside.txt', 'w').write('ok')\n")
    try:
        if caps["private_tmp"]:
            assert r.status == "passed" and not Path("/tmp", name).exists()
    finally:
        Path("/tmp", name).unlink(missing_ok=True)


def test_opening_a_socket_is_refused(sandbox, caps, clean):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = sandbox.run(f"import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n"
                        "print('connected')\n")
    finally:
        server.close()
    assert r.status == "error" and "connected" not in r.stdout, r
    if caps["network"] == "namespace":
        assert "Connection refused" in r.error or "unreachable" in r.error  # the host's port is not reachable
    elif caps["network"] == "audit_hook":
        assert "network access is disabled" in r.error


def test_environment_secrets_do_not_reach_the_program(sandbox, caps, clean, monkeypatch):
    monkeypatch.setenv("LIT_FT_TEST_SECRET", "hunter2-secret")
    r = sandbox.run("import os\nprint(sorted(os.environ))\n"
                    "for pid in (os.getppid(), 1):\n"
                    "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
                    "    except OSError as e:\n        print('refused', type(e).__name__)\n")
    assert r.status == "passed", r
    assert "hunter2-secret" not in r.stdout + r.stderr
    assert r.stdout.splitlines()[0] == "['HOME', 'LANG', 'LC_CTYPE', 'PATH']" or "LIT_FT" not in r.stdout.splitlines()[0]


def test_a_daemonised_child_does_not_outlive_the_run(sandbox, caps, clean):
    if not caps["pid_namespace"]:
        pytest.skip("no PID namespace here: a child that calls setsid() escapes the process-group kill")
    r = sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n")
    assert r.status == "passed"
    # `clean` checks that nothing with our bootstrap is alive


def test_capabilities_claim_only_what_is_enforced(caps):
    assert caps["network"] in ("namespace", "audit_hook", "none")
    if os.geteuid() == 0 and caps["uid"] == 0:
        assert caps["nproc_enforced"] is False  # root ignores RLIMIT_NPROC: it must not be claimed
    if caps["uid"] != 0:
        assert caps["nproc_enforced"] is True
    out = subprocess.run([caps["interpreter"], "-c", "print(1)"], capture_output=True, text=True)
    assert out.stdout == "1\n"


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="`cpu_seconds` must be an int >= 1, got 0"):
        Sandbox(cpu_seconds=0)
    with pytest.raises(ValueError, match="`wall_seconds`"):
        Sandbox(wall_seconds=0)
    with pytest.raises(TypeError, match="`program` must be Python source"):
        Sandbox().run(b"print(1)")  # type: ignore[arg-type]
