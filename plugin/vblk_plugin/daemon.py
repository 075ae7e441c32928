"""A private qemu-storage-daemon owned by the plugin (``image=`` mode).

The daemon is started in nbdkit's final process (after its fork), gets SIGTERM from the kernel
if that process dies (PR_SET_PDEATHSIG), and is stopped by PID at cleanup, at interpreter exit
and on SIGTERM/SIGINT delivered to nbdkit (nbdkit then runs cleanup).  Its command line is
``qsd.qsd_argv``; it counts as started once its socket accepts a connection.  No nbdkit import.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

from vblk_core.errors import ConfigError

from .qsd import QSD, accepts_connection, missing_daemon_hint, qsd_argv

PR_SET_PDEATHSIG = 1


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child between fork and exec: ask the kernel for SIGTERM when nbdkit
        # dies; our own process group, so a ^C in nbdkit's terminal reaches nbdkit, which
        # then stops us in order; and the CPUs of placement= (every daemon thread inherits).
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        os.setpgid(0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)
    return setup


class ManagedDaemon:
    """qemu-storage-daemon serving ``image`` as a vhost-user-blk export on a private socket."""

    def __init__(self, image: str, fmt: str = "raw", num_queues: int = 4, aio: str = "threads",
                 read_only: bool = False, start_timeout: float = 15.0,
                 cpus: frozenset[int] | None = None) -> None:
        self.image = image
        self.cpus = cpus
        self.fmt = fmt
        self.num_queues = num_queues
        self.aio = aio
        self.read_only = read_only
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmpdir = tempfile.mkdtemp(prefix="vblk-")
        self.socket = os.path.join(self.tmpdir, "vhost-user-blk.sock")
        self.log_path = os.path.join(self.tmpdir, "qemu-storage-daemon.log")
        self._stop_supervising: threading.Event | None = None
        self._supervisor: threading.Thread | None = None
        atexit.register(self.stop)

    def command(self) -> list[str]:
        return qsd_argv(self.image, self.socket, fmt=self.fmt, aio=self.aio,
                        num_queues=self.num_queues, writable=not self.read_only)

    def start(self) -> None:
        """Start the daemon and wait until its socket accepts a connection.  Raises
        ConfigError with the daemon's own message if it exits or is not ready within
        start_timeout."""
        if shutil.which(QSD) is None:
            raise ConfigError(f"image=: {QSD} is not installed: {missing_daemon_hint()}")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        with open(self.log_path, "wb") as log:
            proc = self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(self.cpus), close_fds=True)
        deadline = time.monotonic() + self.start_timeout
        while not accepts_connection(self.socket):
            if proc.poll() is not None:
                raise ConfigError(f"image={self.image}: {QSD} exited with status "
                                  f"{proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"image={self.image}: {QSD} did not listen on its socket "
                                  f"within {self.start_timeout:g}s: {self._log_tail()}")
            time.sleep(0.02)

    def supervise(self, on_event: Callable[[str], None] | None = None, max_restarts: int = 5,
                  window: float = 60.0) -> None:
        """Restart the daemon on the same socket if it dies, from a background thread, so the
        device's reconnect logic finds it again.  Gives up after ``max_restarts`` deaths within
        ``window`` seconds.  ``on_event(message)`` is told about each restart."""
        stop = self._stop_supervising = threading.Event()
        deaths: list[float] = []

        def tell(msg: str) -> None:
            if on_event:
                on_event(msg)

        def loop() -> None:
            while not stop.wait(0.2):
                proc = self.proc
                if proc is None or proc.poll() is None:
                    continue
                now = time.monotonic()
                deaths[:] = [t for t in deaths if now - t < window] + [now]
                if len(deaths) > max_restarts:
                    tell(f"{QSD} died {len(deaths)} times in {window:g}s: not restarting it "
                         f"({self._log_tail()})")
                    return
                tell(f"{QSD} exited with status {proc.returncode}; restarting it "
                     f"({self._log_tail()})")
                try:
                    self.start()
                except Exception as e:  # noqa: BLE001 - reported, the device then fails
                    tell(f"restarting {QSD} failed: {e}")
                    return

        self._supervisor = threading.Thread(target=loop, name="vblk-qsd-supervisor",
                                            daemon=True)
        self._supervisor.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read()[-2000:].decode(errors="replace").strip()
        except OSError:
            text = ""
        return text or "(no output)"

    def stop(self) -> None:
        """SIGTERM, wait up to 5 s, then SIGKILL; remove the private directory.  Idempotent."""
        if self._stop_supervising is not None:
            self._stop_supervising.set()
            supervisor = self._supervisor
            if supervisor is not None and supervisor is not threading.current_thread():
                supervisor.join()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if os.path.isdir(self.tmpdir):
            shutil.rmtree(self.tmpdir, ignore_errors=True)
