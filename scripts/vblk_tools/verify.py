"""Model-checked I/O through libnbd (``import nbd``), for scripts/soak and the reliability
tests: workers that keep requests in flight on one NBD connection and compare every read with
an in-memory model, and a helper that times a batch of aio requests.  No pytest import.

    worker = VerifiedWorker(kit.socket, 0, 8 << 20, depth=8, seed=1, max_ops=2000)
    worker.run(); worker.verify_all()
    assert not worker.errors
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any

EXACT, OLD_OR_ZERO, ANY = 0, 1, 2   # what a block of the model may read back as


class VerifiedWorker:
    """Model-checked I/O on one NBD connection over the region [base, base+size): up to
    ``depth`` aio requests in flight, never two overlapping, every read compared with an
    in-memory model (a trimmed block reads as zeroes with ``trim_zeroes``, the case of
    qemu-storage-daemon with discard=unmap on a file, else as before or as zeroes; a write that
    failed leaves its blocks unknown).  Errors are counted, never raised; ``run()`` returns at
    ``stop`` (set or after ``max_ops``) once everything in flight has completed.

    ``mix`` weights of "read", "write", "zero", "trim", "flush".
    """

    def __init__(self, nbd_socket: str, base: int, size: int, *, depth: int = 8, seed: int = 0,
                 block: int = 4096, max_blocks: int = 16, mix: dict | None = None,
                 stop: threading.Event | None = None, max_ops: int | None = None,
                 stall_timeout: float = 60.0, name: str = "worker",
                 trim_zeroes: bool = False) -> None:
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
        self.trim_zeroes = trim_zeroes
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

    def _submit(self, h: Any, pending: dict[int, tuple[Any, ...]]) -> bool:
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

    def _complete(self, entry: tuple[Any, ...], error: Any) -> None:
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
        elif kind == "trim" and self.trim_zeroes:
            self.model[off:off + n] = bytes(n)
            self._mark(off, n, EXACT)
        elif kind == "trim":
            bs = self.block
            for b in range(off // bs, (off + n) // bs):
                if self.state[b] == EXACT:
                    self.state[b] = OLD_OR_ZERO

    def connect(self) -> Any:
        import nbd
        h = nbd.NBD()
        h.connect_unix(self.nbd_socket)
        return h

    def run(self) -> VerifiedWorker:
        """The I/O loop (see the class).  Any exception, not only a failed NBD request, is
        recorded in ``errors``: a worker thread never dies silently."""
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - recorded: the caller asserts on errors
            self._error(f"worker crashed: {type(e).__name__}: {e}")
        return self

    def _run(self) -> None:
        import nbd
        try:
            h = self.handle = self.connect()
        except nbd.Error as e:
            self._error(f"connect failed: {e}", e.errno)
            return
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
                    return
        except nbd.Error as e:
            self._error(f"connection failed: {e}", e.errno)
        return

    def verify_all(self, chunk: int = 1 << 20) -> None:
        """Read the whole region back (on a new connection) and check it against the model.
        Any exception is recorded in ``errors``."""
        try:
            self._verify_all(chunk)
        except BaseException as e:  # noqa: BLE001 - recorded: the caller asserts on errors
            self._error(f"final verify crashed: {type(e).__name__}: {e}")

    def _verify_all(self, chunk: int) -> None:
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


def close_handle(h: Any) -> None:
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


def run_aio(h: Any, submit: list[Any], timeout: float = 30.0,
            t0: float | None = None) -> list[Any]:
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
    return [r for r, f in zip(results, submit, strict=False) if not isinstance(f, tuple)]
