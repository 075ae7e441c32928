"""Helpers for the reliability tests and scripts/soak: a qemu-storage-daemon back-end that can be
killed and started again, an nbdkit+vblk front-end, and verified libnbd workers.

No pytest import here: scripts/soak uses this module too.  Every process is started by this
module with a parent-death signal (so nothing outlives the test process even if it is killed)
and stopped by its PID only.

    backend = Backend(workdir, size=64 << 20).start()
    server = Server(workdir, backend.socket, reconnect_timeout=30).start()
    worker = VerifiedWorker(server.socket, 0, 8 << 20, depth=8, seed=1)
    ...
    server.stop(); backend.stop()
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "plugin" / "plugin.py"
QSD = shutil.which("qemu-storage-daemon") or "/usr/bin/qemu-storage-daemon"
NBDKIT = shutil.which("nbdkit") or "/usr/bin/nbdkit"
SETPRIV = shutil.which("setpriv")
_SO_ACCEPTCON = 0x10000  # /proc/net/unix "Flags" of a listening socket
_UNIX_PATH_MAX = 100


class HarnessError(RuntimeError):
    """A helper process did not start or stop as expected."""


def listening(path: str) -> bool:
    """True if a unix socket bound to ``path`` is listening (checked without connecting: a
    vhost-user back-end serves one front-end, so a probing connection would disturb it)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & _SO_ACCEPTCON:
                    return True
    except OSError:
        return os.path.exists(path)
    return False


def spawn(argv: list[str], log_path: Path | str, death_signal: str = "KILL",
          cwd: Path | str | None = None) -> subprocess.Popen:
    """Start ``argv`` (stdout+stderr appended to log_path) in its own session, with a
    parent-death signal so it cannot outlive the thread that started it.  The PID returned is
    the program's own (setpriv execs it)."""
    if SETPRIV:
        argv = [SETPRIV, f"--pdeathsig={death_signal}", "--", *argv]
    with open(log_path, "ab") as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(map(str, argv))}\n".encode())
        log.flush()
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> tuple[int | None, float, bool]:
    """Send ``sig`` to our child ``proc`` (by PID), wait up to ``timeout``, then SIGKILL.
    Returns (exit status, seconds taken, whether it exited within the timeout)."""
    if proc is None:
        return None, 0.0, True
    t0 = time.monotonic()
    in_time = True
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)  # our own unreaped child: the PID cannot have been reused
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            in_time = False
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, time.monotonic() - t0, in_time


def short_dir(workdir: Path | str) -> Path:
    """``workdir`` if unix socket paths in it fit, else a fresh directory under /tmp."""
    workdir = Path(workdir)
    if len(str(workdir)) + 20 < _UNIX_PATH_MAX:
        return workdir
    return Path(tempfile.mkdtemp(prefix="vblk-rel-", dir="/tmp"))


def make_image(path: Path | str, size: int) -> Path:
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse, reads as zeroes
    return path


class Backend:
    """qemu-storage-daemon exporting a raw image as vhost-user-blk on ``socket``; killable and
    restartable on the same socket and image."""

    def __init__(self, workdir: Path | str, *, name: str = "qsd", size: int = 64 << 20,
                 image: Path | str | None = None, socket: str | None = None,
                 num_queues: int = 4) -> None:
        self.workdir = Path(workdir)
        self.sockdir = short_dir(self.workdir)
        self.image = Path(image) if image else make_image(self.workdir / f"{name}.img", size)
        self.socket = socket or str(self.sockdir / f"{name}.sock")
        self.num_queues = num_queues
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.kills = 0
        self.starts = 0

    def command(self, image: Path | None = None) -> list[str]:
        return [QSD,
                "--blockdev", f"driver=file,node-name=file0,filename={image or self.image},"
                              "discard=unmap",
                "--blockdev", "driver=raw,node-name=raw0,file=file0",
                "--export", f"type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                            f"addr.path={self.socket},writable=on,num-queues={self.num_queues}"]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0, image: Path | str | None = None) -> "Backend":
        """Start (again) and wait until the socket listens.  ``image`` serves another image
        on the same socket (a different device)."""
        if self.running:
            raise HarnessError(f"qemu-storage-daemon already running (pid {self.proc.pid})")
        try:
            os.unlink(self.socket)  # stale socket of a killed daemon
        except FileNotFoundError:
            pass
        self.proc = spawn(self.command(Path(image) if image else None), self.log_path)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not listening(self.socket):
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise HarnessError(f"qemu-storage-daemon exited with status {rc}:\n"
                                   f"{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"qemu-storage-daemon did not listen on {self.socket} "
                                   f"within {timeout:g}s:\n{self.log_text()[-3000:]}")
            time.sleep(0.005)
        return self

    def kill(self) -> None:
        """kill -9 (a crash), reaped; the socket file stays, as after a real crash."""
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL, 10.0)
            self.proc = None
            self.kills += 1

    def stop(self) -> int | None:
        rc, _, _ = stop_process(self.proc, signal.SIGTERM, 10.0)
        self.proc = None
        return rc

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def read_image(self, offset: int = 0, length: int = -1) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def cleanup(self) -> None:
        self.stop()
        if self.sockdir != self.workdir:
            shutil.rmtree(self.sockdir, ignore_errors=True)


class Server:
    """nbdkit serving plugin/plugin.py on a unix socket, attached to a vhost-user socket."""

    def __init__(self, workdir: Path | str, vhost_socket: str, *, name: str = "nbdkit",
                 reconnect_timeout: float | None = None, stats: bool = True,
                 extra: list[str] = (), nbdkit_args: list[str] = ()) -> None:
        self.workdir = Path(workdir)
        self.sockdir = short_dir(self.workdir)
        self.vhost_socket = vhost_socket
        self.socket = str(self.sockdir / f"{name}.sock")
        self.pidfile = self.workdir / f"{name}.pid"
        self.stats_path = self.workdir / f"{name}-stats.json" if stats else None
        self.log_path = self.workdir / f"{name}.log"
        self.reconnect_timeout = reconnect_timeout
        self.extra = list(extra)
        self.nbdkit_args = list(nbdkit_args)
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def command(self) -> list[str]:
        cmd = [NBDKIT, "-f", "-U", self.socket, "-P", str(self.pidfile), *self.nbdkit_args,
               "python", str(PLUGIN), f"socket={self.vhost_socket}"]
        if self.reconnect_timeout is not None:
            cmd.append(f"reconnect-timeout={self.reconnect_timeout:g}")
        if self.stats_path:
            cmd.append(f"stats={self.stats_path}")
        return cmd + self.extra

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> "Server":
        for p in (self.pidfile, Path(self.socket)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        self.proc = spawn(self.command(), self.log_path, death_signal="TERM")
        deadline = time.monotonic() + timeout
        while not (self.pidfile.exists() and self.pidfile.stat().st_size
                   and listening(self.socket)):
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise HarnessError(f"nbdkit exited with status {rc}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise HarnessError(f"nbdkit did not listen within {timeout:g}s:\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> tuple[int | None, float, bool]:
        """SIGTERM and wait.  Returns (exit status, seconds, exited within timeout)."""
        result = stop_process(self.proc, signal.SIGTERM, timeout)
        self.proc = None
        return result

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict | None:
        """The last stats JSON the plugin wrote (None if none yet)."""
        try:
            with open(self.stats_path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_stats(self, predicate, timeout: float = 10.0) -> dict | None:
        """Poll the stats file until predicate(stats) holds; returns the last stats read."""
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.stats()
            if st is not None and predicate(st):
                return st
            time.sleep(0.2)
        return st

    def connect(self, strict: bool = True):
        import nbd
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.connect_unix(self.socket)
        return h

    def cleanup(self) -> None:
        # nbdkit 1.32 waits for connected clients on SIGTERM: do not wait long for it here.
        self.stop(5.0)
        if self.sockdir != self.workdir:
            shutil.rmtree(self.sockdir, ignore_errors=True)


# --- verified I/O ------------------------------------------------------------------------------

EXACT, OLD_OR_ZERO, ANY = 0, 1, 2   # what a block of the model may read back as


class VerifiedWorker:
    """Model-checked I/O on one NBD connection over the region [base, base+size): up to
    ``depth`` aio requests in flight, never two overlapping, every read compared with an
    in-memory model (a trimmed block may read as before or as zeroes; a write that failed
    leaves its blocks unknown).  Errors are counted, never raised; ``run()`` returns at
    ``stop`` (set or after ``max_ops``) once everything in flight has completed.

    ``mix`` weights of "read", "write", "zero", "trim", "flush".
    """

    def __init__(self, nbd_socket: str, base: int, size: int, *, depth: int = 8, seed: int = 0,
                 block: int = 4096, max_blocks: int = 16, mix: dict | None = None,
                 stop: threading.Event | None = None, max_ops: int | None = None,
                 stall_timeout: float = 60.0, name: str = "worker") -> None:
        assert base % block == 0 and size % block == 0 and size >= block
        self.nbd_socket = nbd_socket
        self.base, self.size, self.block = base, size, block
        self.depth = depth
        self.rng = random.Random(seed)
        self.max_blocks = max_blocks
        self.mix = mix or {"read": 45, "write": 45}
        self.stop = stop or threading.Event()
        self.max_ops = max_ops
        self.stall_timeout = stall_timeout
        self.name = name
        self.model = bytearray(size)               # sparse images read as zeroes
        self.state = bytearray(size // block)      # EXACT / OLD_OR_ZERO / ANY per block
        self.busy = bytearray(size // block)       # 1 = a request in flight covers the block
        self.ops = 0
        self.ops_by_kind = {k: 0 for k in ("read", "write", "zero", "trim", "flush")}
        self.bytes_written = 0
        self.bytes_verified = 0
        self.errors: list[str] = []
        self.error_errnos: list[str | None] = []
        self.max_latency = 0.0
        self.handle = None
        self._kinds = list(self.mix)
        self._weights = [self.mix[k] for k in self._kinds]

    # --- model ---------------------------------------------------------------------------------

    def _error(self, msg: str, errno_name: str | None = None) -> None:
        self.errors.append(f"{self.name}: {msg}")
        self.error_errnos.append(errno_name)

    def _verify(self, off: int, data: bytes | bytearray, source: str = "read") -> None:
        """Compare ``data`` read at region offset ``off`` with the model."""
        n = len(data)
        if self.model[off:off + n] == data:
            self.bytes_verified += n
            return
        bs = self.block
        zero = bytes(bs)
        for pos in range(0, n, bs):
            b = (off + pos) // bs
            got = data[pos:pos + bs]
            if self.model[off + pos:off + pos + bs] == got:
                continue
            st = self.state[b]
            if st == ANY or (st == OLD_OR_ZERO and got == zero):
                self.model[off + pos:off + pos + bs] = got
                self.state[b] = EXACT
                continue
            want = bytes(self.model[off + pos:off + pos + 16])
            self._error(f"{source}: data mismatch at byte {self.base + off + pos} "
                        f"(block state {st}): got {bytes(got[:16])!r}..., "
                        f"want {want!r}...")
            return
        self.bytes_verified += n

    def _mark(self, off: int, n: int, state: int) -> None:
        bs = self.block
        self.state[off // bs:(off + n) // bs] = bytes([state]) * (n // bs)

    # --- the loop ------------------------------------------------------------------------------

    def _pick_range(self) -> tuple[int, int] | None:
        nblocks = len(self.busy)
        for _ in range(4):
            count = self.rng.randint(1, min(self.max_blocks, nblocks))
            start = self.rng.randrange(0, nblocks - count + 1)
            if not any(self.busy[start:start + count]):
                return start, count
        return None

    def _submit(self, h, pending: dict) -> bool:
        import nbd
        kind = self.rng.choices(self._kinds, self._weights)[0]
        now = time.monotonic()
        if kind == "flush":
            cookie = h.aio_flush()
            pending[cookie] = ("flush", 0, 0, None, None, now)
            return True
        rng = self._pick_range()
        if rng is None:
            return False
        start, count = rng
        off, n = start * self.block, count * self.block
        self.busy[start:start + count] = b"\1" * count
        offset = self.base + off
        if kind == "read":
            buf = nbd.Buffer(n)
            cookie = h.aio_pread(buf, offset)
            pending[cookie] = ("read", off, n, buf, None, now)
        elif kind == "write":
            data = self.rng.randbytes(n)
            flags = nbd.CMD_FLAG_FUA if self.rng.random() < 0.1 else 0
            buf = nbd.Buffer.from_bytearray(data)
            cookie = h.aio_pwrite(buf, offset, flags=flags)
            pending[cookie] = ("write", off, n, buf, data, now)
        elif kind == "zero":
            flags = self.rng.choice([0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA,
                                     nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA])
            cookie = h.aio_zero(n, offset, flags=flags)
            pending[cookie] = ("zero", off, n, None, None, now)
        elif kind == "trim":
            cookie = h.aio_trim(n, offset)
            pending[cookie] = ("trim", off, n, None, None, now)
        return True

    def _complete(self, entry: tuple, error) -> None:
        kind, off, n, buf, data, t0 = entry
        self.max_latency = max(self.max_latency, time.monotonic() - t0)
        self.ops += 1
        self.ops_by_kind[kind] += 1
        if n:
            self.busy[off // self.block:(off + n) // self.block] = bytes(n // self.block)
        if error is not None:
            self._error(f"{kind} of {n} bytes at {self.base + off} failed: {error}",
                        getattr(error, "errno", None))
            if kind in ("write", "zero", "trim"):
                self._mark(off, n, ANY)
            return
        if kind == "read":
            self._verify(off, buf.to_bytearray())
        elif kind == "write":
            self.model[off:off + n] = data
            self._mark(off, n, EXACT)
            self.bytes_written += n
        elif kind == "zero":
            self.model[off:off + n] = bytes(n)
            self._mark(off, n, EXACT)
        elif kind == "trim":
            bs = self.block
            for b in range(off // bs, (off + n) // bs):
                if self.state[b] == EXACT:
                    self.state[b] = OLD_OR_ZERO

    def connect(self):
        import nbd
        h = nbd.NBD()
        h.connect_unix(self.nbd_socket)
        return h

    def run(self) -> "VerifiedWorker":
        import nbd
        try:
            h = self.handle = self.connect()
        except nbd.Error as e:
            self._error(f"connect failed: {e}", e.errno)
            return self
        pending: dict = {}
        last_progress = time.monotonic()
        try:
            while True:
                stopping = self.stop.is_set() or (self.max_ops is not None
                                                  and self.ops + len(pending) >= self.max_ops)
                while not stopping and len(pending) < self.depth:
                    if not self._submit(h, pending):
                        break
                    stopping = self.max_ops is not None and self.ops + len(pending) >= self.max_ops
                if not pending:
                    if stopping:
                        break
                    continue
                h.poll(500)
                done = False
                for cookie in list(pending):
                    try:
                        if not h.aio_command_completed(cookie):
                            continue
                        err = None
                    except nbd.Error as e:
                        err = e
                    self._complete(pending.pop(cookie), err)
                    done = True
                now = time.monotonic()
                if done:
                    last_progress = now
                elif now - last_progress > self.stall_timeout:
                    self._error(f"no request completed for {self.stall_timeout:g}s "
                                f"({len(pending)} in flight): hang")
                    return self
        except nbd.Error as e:
            self._error(f"connection failed: {e}", e.errno)
        return self

    def verify_all(self, chunk: int = 1 << 20) -> None:
        """Read the whole region back (on a new connection) and check it against the model."""
        import nbd
        try:
            h = self.connect()
        except nbd.Error as e:
            self._error(f"final verify: connect failed: {e}", e.errno)
            return
        try:
            for off in range(0, self.size, chunk):
                n = min(chunk, self.size - off)
                data = h.pread(n, self.base + off)
                self._verify(off, data, "final read")
        except nbd.Error as e:
            self._error(f"final verify failed: {e}", e.errno)
        finally:
            close_handle(h)

    def close(self) -> None:
        if self.handle is not None:
            close_handle(self.handle)
            self.handle = None

    def image_mismatch(self, image: bytes) -> str | None:
        """Compare the region of a raw image (all of it, from offset 0) with the model; only
        blocks whose content is exactly known are compared.  None if they agree."""
        region = image[self.base:self.base + self.size]
        if len(region) != self.size:
            return f"{self.name}: image too short"
        bs = self.block
        if region == self.model:
            return None
        for b in range(self.size // bs):
            if self.state[b] == ANY:
                continue
            got, want = region[b * bs:(b + 1) * bs], self.model[b * bs:(b + 1) * bs]
            if got != want and not (self.state[b] == OLD_OR_ZERO and got == bytes(bs)):
                return (f"{self.name}: image differs from the model at byte {self.base + b * bs}: "
                        f"{got[:16]!r}... != {bytes(want[:16])!r}...")
        return None


def close_handle(h) -> None:
    """Disconnect politely if possible; libnbd's Python handle closes when collected."""
    import nbd
    try:
        if h.aio_is_ready() or h.aio_is_processing():
            h.shutdown()
    except nbd.Error:
        pass


def run_workers(workers: list[VerifiedWorker]) -> list[threading.Thread]:
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    for t in threads:
        t.start()
    return threads


def run_aio(h, submit: list, timeout: float = 30.0, t0: float | None = None) -> list:
    """Submit each ``submit[i](h)`` (returning a cookie) and wait for all of them.  An item
    ``("do", fn)`` instead runs ``fn()`` at that point of the submission (e.g. kill the daemon
    between requests); its result is None and ``t0`` becomes the time it ran.

    Returns, per request, (errno name or None for success, seconds from ``t0`` (default: the
    submission) to completion); a request still pending at ``timeout`` gives ("HANG", None)."""
    import nbd
    start = time.monotonic()
    t0 = start if t0 is None else t0
    cookies = []
    results: list = [None] * len(submit)
    for i, f in enumerate(submit):
        if isinstance(f, tuple):
            f[1]()
            t0 = time.monotonic()
            continue
        try:
            cookies.append((f(h), i))
        except nbd.Error as e:
            results[i] = (e.errno or str(e), time.monotonic() - t0)
    pending = dict(cookies)
    while pending and time.monotonic() - start < timeout:
        h.poll(100)
        for cookie in list(pending):
            try:
                if not h.aio_command_completed(cookie):
                    continue
                err = None
            except nbd.Error as e:
                err = e.errno or str(e)
            results[pending.pop(cookie)] = (err, time.monotonic() - t0)
    for i in pending.values():
        results[i] = ("HANG", None)
    return [r for r, f in zip(results, submit) if not isinstance(f, tuple)]
