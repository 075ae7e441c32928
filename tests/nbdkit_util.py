"""Helpers for end-to-end tests of plugin/plugin.py: start and stop nbdkit, always by PID, and
find qemu-storage-daemon processes left behind.  (Daemons for socket= come from conftest's
``qsd_factory``; image= mode makes the plugin start its own.)

Everything here talks to real programs: nbdkit, qemu-storage-daemon, and libnbd's Python
binding (``import nbd``) in-process.  Sockets are unix sockets in short private directories
(a unix socket path must fit in 108 bytes, pytest's tmp_path may not).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugin" / "plugin.py"
QSD = "qemu-storage-daemon"
NBDKIT = "nbdkit"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def short_tmpdir(prefix: str = "vbt-") -> str:
    """A private directory with a short path (for unix sockets)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def _stop_pid(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM ``proc`` (by PID), wait, SIGKILL after ``timeout``.  Returns the exit status."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _wait_for(pred, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


class Nbdkit:
    """``nbdkit -f -U SOCK -P PIDFILE python plugin/plugin.py KEY=VALUE...``.

    ``start()`` returns once the pidfile and the socket exist and raises if nbdkit exits
    first.  nbdkit (1.32) writes the pidfile before the plugin's after_fork has connected the
    device; a client connecting earlier simply waits in the listen backlog until then.
    """

    def __init__(self, params: dict | list, workdir: str, readonly: bool = False,
                 extra_args: list[str] | None = None, name: str = "nbd") -> None:
        if isinstance(params, dict):
            params = [f"{k}={v}" for k, v in params.items()]
        self.params = list(params)
        self.workdir = workdir
        self.socket = os.path.join(workdir, name + ".sock")
        self.pidfile = os.path.join(workdir, name + ".pid")
        self.stderr_path = os.path.join(workdir, name + ".stderr")
        self.readonly = readonly
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def command(self) -> list[str]:
        cmd = [NBDKIT, "-f", "-U", self.socket, "-P", self.pidfile]
        if self.readonly:
            cmd.append("-r")
        return cmd + self.extra_args + ["python", str(PLUGIN)] + self.params

    def start(self) -> "Nbdkit":
        for p in (self.socket, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=subprocess.STDOUT)
        ok = _wait_for(lambda: (os.path.exists(self.pidfile) and os.path.getsize(self.pidfile)
                                and os.path.exists(self.socket)) or self.proc.poll() is not None,
                       START_TIMEOUT)
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"nbdkit did not start (status {self.returncode}): "
                               f"{self.stderr()}")
        pid = int(Path(self.pidfile).read_text().strip())
        assert pid == self.proc.pid, (pid, self.proc.pid)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")
        except OSError:
            return ""

    def connect(self, strict: bool = True):
        import nbd
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.connect_uri(self.uri)
        return h

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 10 s).  Returns nbdkit's exit status."""
        if self.proc is not None:
            self.returncode = _stop_pid(self.proc)
            self.proc = None
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL nbdkit (by PID) and reap it."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.returncode = self.proc.wait()
            self.proc = None
        return self.returncode

    def __enter__(self) -> "Nbdkit":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_nbdkit_expect_failure(params: list[str], workdir: str,
                              timeout: float = 30.0) -> tuple[int | None, str, float]:
    """Run nbdkit with ``params`` that should be refused.  Returns (status, output, seconds).
    If nbdkit is still running after ``timeout`` it is stopped and status is None."""
    k = Nbdkit(params, workdir, name="bad")
    with open(k.stderr_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(k.command(), stdin=subprocess.DEVNULL, stdout=err,
                                stderr=subprocess.STDOUT)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _stop_pid(proc)
            status = None
        elapsed = time.monotonic() - t0
    return status, k.stderr(), elapsed


def qsd_processes(needle: str) -> list[psutil.Process]:
    """Running qemu-storage-daemon processes whose command line mentions ``needle``."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            cmdline = p.info["cmdline"] or []
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if (p.info["name"] == QSD or (cmdline and os.path.basename(cmdline[0]) == QSD)) \
                    and any(needle in arg for arg in cmdline):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_qsd(needle: str, timeout: float = 5.0) -> list[psutil.Process]:
    """Poll until no qemu-storage-daemon mentions ``needle``.  Returns the survivors (empty on
    success); the caller kills them by PID after failing the test."""
    deadline = time.monotonic() + timeout
    while True:
        left = qsd_processes(needle)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_procs(procs: list[psutil.Process]) -> None:
    """SIGKILL the given processes by PID (clean-up after a failed no-survivor check)."""
    for p in procs:
        try:
            p.kill()
            p.wait(5)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def first_difference(a, b) -> int | None:
    """Offset of the first differing byte of two buffers (None if equal).  Cheap on equal
    buffers, and avoids pytest's diff of megabytes of bytes."""
    a, b = memoryview(a).cast("B"), memoryview(b).cast("B")
    if a == b:
        return None
    n = min(len(a), len(b))
    lo, step = 0, 1 << 20
    while lo < n and a[lo:lo + step] == b[lo:lo + step]:
        lo += step
    for i in range(lo, min(lo + step, n)):
        if a[i] != b[i]:
            return i
    return n


def assert_same_bytes(actual, expected, what: str, base: int = 0) -> None:
    if len(actual) != len(expected):
        raise AssertionError(f"{what}: length {len(actual)} != expected {len(expected)}")
    pos = first_difference(actual, expected)
    if pos is not None:
        raise AssertionError(
            f"{what}: first difference at byte {base + pos} (sector {(base + pos) // 512}): "
            f"got {bytes(actual[pos:pos + 16]).hex()} expected {bytes(expected[pos:pos + 16]).hex()}")


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()
