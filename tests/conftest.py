"""Shared fixtures: a real qemu-storage-daemon (vhost-user-blk back-end) and a BlockDevice on it.

``qsd_factory(...)`` starts a daemon on a fresh raw image in the test's tmp_path and returns a
``QsdDaemon``; every daemon it made is stopped by PID at teardown (SIGTERM, wait, SIGKILL).
A daemon can be stopped, killed (``kill()`` = SIGKILL) and started again on the same socket and
image, which the reliability and plugin tests rely on.

    def test_x(qsd_factory):
        qsd = qsd_factory(num_queues=4, size=64 << 20, writable=True, aio=None, content=b"...")
        with vblk_core.BlockDevice(qsd.socket) as dev: ...

``qsd`` is a default daemon (4 queues, 64 MiB, writable, discard=unmap) and ``device`` a
``BlockDevice`` on it, closed at teardown.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from reliability_util import listening as _listening  # no connection: see its docstring

QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
DEFAULT_SIZE = 64 << 20
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes; stay clear of it


def pattern(length: int, seed: int = 0) -> bytes:
    """Deterministic, position-dependent bytes (no two 512-byte sectors alike)."""
    out = bytearray(length)
    for pos in range(0, length, 512):
        n = min(512, length - pos)
        tag = f"<{seed}:{pos}>".encode()
        out[pos:pos + n] = (tag * (512 // len(tag) + 1))[:n]
    return bytes(out)


class QsdDaemon:
    """One qemu-storage-daemon exporting a raw image as vhost-user-blk on a unix socket."""

    def __init__(self, workdir: Path, name: str = "qsd", *, size: int = DEFAULT_SIZE,
                 num_queues: int = 1, writable: bool = True, aio: str | None = None,
                 discard: str = "unmap", content: bytes | None = None,
                 logical_block_size: int | None = None, image: Path | None = None,
                 socket_dir: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.num_queues = num_queues
        self.writable = writable
        self.aio = aio
        self.discard = discard
        self.logical_block_size = logical_block_size
        self.log_path = self.workdir / f"{name}.log"
        self._own_socket_dir: str | None = None
        if image is None:
            image = self.workdir / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(size)  # sparse
                if content:
                    f.write(content)
        self.image = Path(image)
        sock_dir = Path(socket_dir) if socket_dir is not None else self.workdir
        sock = sock_dir / f"{name}.sock"
        if len(str(sock)) > _UNIX_PATH_MAX:
            self._own_socket_dir = tempfile.mkdtemp(prefix="vblk-", dir="/tmp")
            sock = Path(self._own_socket_dir) / f"{name}.sock"
        self.socket = str(sock)
        self.proc: subprocess.Popen | None = None

    # --- command line ------------------------------------------------------------------------

    def command(self) -> list[str]:
        file_opts = f"driver=file,node-name=file0,filename={self.image}"
        raw_opts = "driver=raw,node-name=raw0,file=file0"
        if self.discard:
            # Both nodes: with discard=unmap on the file node only, the raw node (default
            # discard=ignore) swallows every DISCARD and nothing reaches the image.
            file_opts += f",discard={self.discard}"
            raw_opts += f",discard={self.discard}"
        if self.aio:
            file_opts += f",aio={self.aio}"
        export = (f"type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                  f"addr.path={self.socket},writable={'on' if self.writable else 'off'},"
                  f"num-queues={self.num_queues}")
        if self.logical_block_size:
            export += f",logical-block-size={self.logical_block_size}"
        return [QSD, "--blockdev", file_opts, "--blockdev", raw_opts, "--export", export]

    # --- lifetime ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = START_TIMEOUT) -> "QsdDaemon":
        """Start the daemon and wait until its socket listens.  Restartable after stop/kill."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        try:
            os.unlink(self.socket)  # a stale socket from a killed daemon
        except FileNotFoundError:
            pass
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start: {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not _listening(self.socket):
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                pytest.fail(f"qemu-storage-daemon exited with status {rc} before listening on "
                            f"{self.socket}\ncommand: {' '.join(cmd)}\nlog:\n{self.log_text()}",
                            pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"qemu-storage-daemon did not listen on {self.socket} within "
                            f"{timeout:g}s\ncommand: {' '.join(cmd)}\nlog:\n{self.log_text()}",
                            pytrace=False)
            time.sleep(0.005)
        return self

    def _signal_and_wait(self, sig: int, timeout: float) -> bool:
        proc = self.proc
        try:
            os.kill(proc.pid, sig)  # our own child, by PID: not reaped yet, so not reused
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, then SIGKILL.  Returns the exit status (None if not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and not self._signal_and_wait(signal.SIGTERM, timeout):
            self._signal_and_wait(signal.SIGKILL, timeout)
        rc = self.proc.wait()
        self.proc = None
        return rc

    def kill(self) -> int | None:
        """SIGKILL (a crash), reaped.  The socket file stays behind, as after a real crash."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT)
        rc = self.proc.wait()
        self.proc = None
        return rc

    def restart(self, timeout: float = START_TIMEOUT) -> "QsdDaemon":
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.stop()
        if self._own_socket_dir:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
            self._own_socket_dir = None

    # --- image helpers -----------------------------------------------------------------------

    def read_image(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(-1 if length is None else length)

    def __repr__(self) -> str:
        return f"<QsdDaemon {self.name} pid={self.pid} socket={self.socket}>"


@pytest.fixture
def qsd_factory(tmp_path):
    """``qsd_factory(**kwargs)`` -> a started QsdDaemon (see QsdDaemon for the options);
    pass ``start=False`` to get it unstarted.  All are stopped at teardown."""
    daemons: list[QsdDaemon] = []

    def make(name: str | None = None, *, start: bool = True, **kwargs) -> QsdDaemon:
        d = QsdDaemon(tmp_path, name or f"qsd{len(daemons)}", **kwargs)
        daemons.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in daemons:
        d.cleanup()


@pytest.fixture
def qsd(qsd_factory):
    """A writable 64 MiB daemon with 4 queues and discard=unmap."""
    return qsd_factory(num_queues=4)


@pytest.fixture
def device(qsd):
    """A BlockDevice on ``qsd`` (all of its queues), closed at teardown."""
    import vblk_core
    dev = vblk_core.BlockDevice(qsd.socket)
    yield dev
    dev.close()
