"""Durability, the way a storage user asks about it, through nbdkit + vblk + qemu-storage-daemon.

- nbdkit is killed (SIGKILL) in the middle of a write load: every write acknowledged before the
  last completed flush, and every acknowledged FUA write, is on stable storage.  Three loads:
  flushes without FUA (nothing but the flush can make those writes stable), FUA without
  flushes, and both.  Stable storage
  is judged by an independent witness: the daemon's blklogwrites log (tests/dmlog.py) replayed
  up to the last flush the device received, which is what a power cut at the moment of the kill
  could not take away (the page cache would hide a missing flush from anyone reading the image
  file).  The image file itself must hold every acknowledged write, byte for byte.
- The back-end's disk fills up (the image on an 8 MiB tmpfs of the daemon's own, mounted in a
  private mount namespace): writes fail with an errno the client sees, nothing hangs, and once
  space is freed (the client trims) writes succeed again, with nothing restarted.
"""
from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import need_module, need_program
from dmlog import WriteLog
from vblk_tools.verify import close_handle

nbd = need_module("nbd", "python3-libnbd")

MiB = 1 << 20
SIZE = 32 * MiB
SLOT = 64 * 1024          # every write goes to a slot of its own: written once, never again


@dataclass
class Write:
    offset: int
    data: bytes
    fua: bool
    acked: int | None = None      # the event number of its reply (None: no reply)


class Load:
    """Writes (``fua_share`` of them FUA) and, while ``flushing``, flushes, on several
    connections, each with up to ``depth`` requests in flight.  Every event gets a number
    from one counter: a write's reply, a flush's submission.  ``durable_before`` is the
    submission number of the latest flush that completed: every write acknowledged before it
    must be on stable storage."""

    def __init__(self, socket: str, connections: int = 2, depth: int = 8, seed: int = 0,
                 fua_share: float = 0.25, flushing: bool = True) -> None:
        self.socket = socket
        self.depth = depth
        self.fua_share = fua_share
        self.rng = random.Random(seed)
        self.slots = list(range(SIZE // SLOT))
        self.rng.shuffle(self.slots)
        self.events = itertools.count(1)
        self.lock = threading.Lock()
        self.writes: list[Write] = []
        self.durable_before = 0
        self.flushes_done = 0
        self.flushes_in_flight = 0
        self.flushing = flushing      # cleared for the last phase
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(connections)]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def acked(self, *, fua: bool | None = None, after: int = 0) -> list[Write]:
        return [w for w in list(self.writes) if w.acked is not None and w.acked > after
                and (fua is None or w.fua == fua)]

    def _next_write(self, rng: random.Random) -> Write | None:
        with self.lock:
            if not self.slots:
                return None
            slot = self.slots.pop()
        length = rng.randint(1, SLOT // 4096) * 4096
        w = Write(slot * SLOT, rng.randbytes(length), rng.random() < self.fua_share)
        self.writes.append(w)
        return w

    def _run(self, index: int) -> None:
        rng = random.Random(self.rng.random() + index)
        try:
            h = nbd.NBD()
            h.connect_unix(self.socket)
        except nbd.Error as e:
            self.errors.append(f"connect: {e}")
            return
        pending: dict[int, tuple[str, Any, Any]] = {}
        try:
            while not self.stop.is_set():
                while len(pending) < self.depth:
                    with self.lock:     # (no flush can start once ``flushing`` is cleared)
                        flush = self.flushing and rng.random() < 0.06
                        if flush:
                            submitted = next(self.events)
                            self.flushes_in_flight += 1
                    if flush:
                        pending[h.aio_flush()] = ("flush", submitted, None)
                        continue
                    w = self._next_write(rng)
                    if w is None:
                        break
                    buf = nbd.Buffer.from_bytearray(bytearray(w.data))
                    cookie = h.aio_pwrite(buf, w.offset, flags=nbd.CMD_FLAG_FUA if w.fua else 0)
                    pending[cookie] = ("write", w, buf)
                if not pending:
                    break
                h.poll(100)
                for cookie in list(pending):
                    if not h.aio_command_completed(cookie):     # raises if it failed
                        continue
                    kind, what, _buf = pending.pop(cookie)
                    if kind == "write":
                        what.acked = next(self.events)
                    else:
                        with self.lock:
                            self.durable_before = max(self.durable_before, what)
                            self.flushes_done += 1
                            self.flushes_in_flight -= 1
        except nbd.Error:
            pass       # nbdkit was killed: the requests in flight get no reply
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"connection {index}: {type(e).__name__}: {e}")

    def wait(self, what: str, predicate, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.errors or not any(t.is_alive() for t in self.threads):
                pytest.fail(f"the load stopped before {what}: {self.errors}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:g}s")
            time.sleep(0.01)


#: (FUA share of the writes, flushes in the first phase)
MIXES = {
    # flush judged alone: no FUA write could make anything stable
    "flushes": (0.0, True),
    # FUA judged alone: no flush ever
    "fua": (0.25, False),
    # both, as clients do; the FUA writes judged are those after the last flush finished
    "mixed": (0.25, True),
}


@pytest.mark.parametrize("mix", list(MIXES))
def test_sigkill_of_nbdkit_loses_no_flushed_or_fua_write(qsd_factory, nbdkit_factory, mix):
    fua_share, flushing = MIXES[mix]
    backend = qsd_factory(size=SIZE, num_queues=2, write_log=True)
    server = nbdkit_factory({"socket": backend.socket}, nbdkit_args=["-t", "4"])
    load = None
    try:
        load = Load(server.socket, seed=int.from_bytes(os.urandom(4), "little"),
                    fua_share=fua_share, flushing=flushing).start()
        if flushing:
            load.wait("100 writes covered by a completed flush, and 3 flushes",
                      lambda: load.flushes_done >= 3 and len(
                          [w for w in load.acked() if w.acked < load.durable_before]) >= 100)
        # The last phase: no more flushes.  Once none is in flight, only FUA can make a
        # write stable: the FUA writes acknowledged after that are what judges FUA.
        with load.lock:
            load.flushing = False
        load.wait("the last flush to complete", lambda: load.flushes_in_flight == 0)
        quiet = next(load.events)
        load.wait("writes after the last flush",
                  lambda: len(load.acked(fua=False, after=quiet)) >= 8
                  and len(load.acked(fua=True, after=quiet)) >= (4 if fua_share else 0))
        assert backend.pid is not None
        # Freeze the daemon, then kill nbdkit: what the device has then is what it keeps
        # (nothing the daemon might flush when its front-end goes away counts).
        os.kill(backend.pid, signal.SIGSTOP)
        server.kill()
        load.stop.set()
        for t in load.threads:
            t.join(30)
        assert not any(t.is_alive() for t in load.threads), "a client hung after nbdkit died"
        assert not load.errors, load.errors
        backend.kill()
    finally:
        if load is not None:
            load.stop.set()
    bound = load.durable_before
    assert (bound > 0) == flushing, f"flushes completed: {load.flushes_done}"
    with open(backend.image, "rb") as f:
        image = f.read()
    assert backend.write_log is not None
    log = WriteLog.read(backend.write_log)
    replayed = log.replay(bytearray(SIZE))
    durable = log.durable(SIZE)
    flushed = [w for w in load.acked() if w.acked is not None and w.acked < bound]
    fua_after = load.acked(fua=True, after=quiet)
    assert bound < quiet and len(flushed) >= (100 if flushing else 0), (bound, quiet)
    assert len(fua_after) >= (4 if fua_share else 0), len(fua_after)
    for what, writes in [("acknowledged before the last completed flush", flushed),
                         ("acknowledged FUA", load.acked(fua=True))]:
        lost = [w for w in writes if durable[w.offset:w.offset + len(w.data)] != w.data]
        assert not lost, (f"{len(lost)} of {len(writes)} writes {what} are not on stable "
                          f"storage (the log up to its last flush), e.g. {len(lost[0].data)} "
                          f"bytes at {lost[0].offset}")
    # Every acknowledged write is in the image, and in the log; one without a reply (in flight
    # when the daemon was frozen) is there or not, sector by sector, in each of them; nothing
    # was written anywhere else.
    expected = bytearray(SIZE)
    unsure = []
    for w in load.writes:
        if w.acked is not None:
            expected[w.offset:w.offset + len(w.data)] = w.data
        else:
            unsure.append(w)
    for name, content in (("image", image), ("write log", replayed)):
        wanted = bytearray(expected)
        for w in unsure:
            for s in range(0, len(w.data), 512):
                got = content[w.offset + s:w.offset + s + 512]
                assert got in (bytes(512), w.data[s:s + 512]), \
                    f"{name}: sector at {w.offset + s} of a write in flight holds other data"
                wanted[w.offset + s:w.offset + s + 512] = got
        assert content == wanted, f"the {name} differs from the acknowledged writes"
    print(f"writes {len(load.writes)} (acked {len(load.acked())}, in flight {len(unsure)}), "
          f"flushes {load.flushes_done}, durable before #{bound}: {len(flushed)} writes, "
          f"FUA after the last flush: {len(fua_after)}, log entries {len(log.entries)}")


# --- the back-end's disk fills up ---------------------------------------------------------------

def _small_tmpfs_prefix(mountpoint: Path, size: str, image_size: int) -> list[str]:
    """A command prefix that mounts a tmpfs of ``size`` on ``mountpoint`` in a mount namespace
    of its own (so nothing outlives the daemon), creates a sparse image of ``image_size``
    there, and execs the rest of the command line with a parent-death signal (a new user
    namespace clears the one set before it)."""
    unshare = need_program("unshare", "util-linux")
    setpriv = need_program("setpriv", "util-linux")
    flags = ["-m"] if os.geteuid() == 0 else ["-Urm"]
    if not _propagates(mountpoint):
        # unshare makes every mount private by default, which the kernel refuses where / is
        # not a mount point (a chroot, as in a fresh debootstrap root); where the mount that
        # holds the mountpoint propagates nowhere anyway, leaving propagation alone is safe.
        flags += ["--propagation", "unchanged"]
    script = ('mount -t tmpfs -o size="$1" vblk-full "$0" && truncate -s "$2" "$0/disk.img" '
              f'&& shift 2 && exec {setpriv} --pdeathsig=KILL -- "$@"')
    return [unshare, *flags, "--", "sh", "-c", script, os.fspath(mountpoint), size,
            str(image_size)]


def _propagates(path: Path) -> bool:
    """Whether the mount holding ``path`` is shared (a mount below it would appear in other
    mount namespaces too), from /proc/self/mountinfo.  No visible holding mount means a chroot
    whose root is no mount point: a namespace of its own, as fresh-machine.sh makes (and where
    unshare's default, making / private, is refused anyway)."""
    target = os.path.realpath(path)
    best: tuple[int, bool] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mnt = fields[4]
            optional = fields[6:fields.index("-")]
            if target == mnt or target.startswith(mnt.rstrip("/") + "/"):
                if best is None or len(mnt) > best[0]:
                    best = (len(mnt), any(o.startswith("shared:") for o in optional))
    return False if best is None else best[1]


def _write(h: Any, data: bytes, offset: int, timeout: float = 20.0) -> str | None:
    """One write: None on success, the errno name on failure, "HANG" if no reply in time."""
    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), offset)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h.poll(100)
        try:
            if h.aio_command_completed(cookie):
                return None
        except nbd.Error as e:
            return e.errno or str(e)
    return "HANG"


def test_disk_full_fails_writes_and_recovers_when_space_is_freed(tmp_path, qsd_factory,
                                                                 nbdkit_factory):
    mnt = tmp_path / "small"
    mnt.mkdir()
    backend = qsd_factory(image=mnt / "disk.img", num_queues=2,
                          prefix=_small_tmpfs_prefix(mnt, "8m", SIZE))
    server = nbdkit_factory({"socket": backend.socket, "reconnect-timeout": 30}, stats=True)
    qsd_pid, nbdkit_pid = backend.pid, server.pid
    h = server.connect()
    rng = random.Random(11)
    chunks: dict[int, bytes] = {}
    failed_at = None
    for k in range(16):
        data = rng.randbytes(MiB)
        t0 = time.monotonic()
        err = _write(h, data, k * MiB)
        took = time.monotonic() - t0
        assert err != "HANG", f"write {k} got no reply in 20 s on a full disk"
        if err is None:
            chunks[k] = data
            continue
        assert err in ("ENOSPC", "EIO"), f"write {k} on a full disk failed with {err}"
        assert took < 10, f"the failing write {k} took {took:.1f}s"
        if failed_at is None:
            failed_at = k
    assert failed_at is not None and failed_at <= 8, "an 8 MiB disk took 16 MiB of writes"
    assert len(chunks) >= 4, f"only {len(chunks)} MiB fitted on the 8 MiB disk"
    # what fitted is readable, and the server still answers everything else
    for k, data in chunks.items():
        assert h.pread(MiB, k * MiB) == data, f"chunk {k} changed"
    # free space: trim the first 4 MiB (a hole in the tmpfs file gives its pages back)
    h.trim(4 * MiB, 0)
    for k in range(4):
        chunks.pop(k, None)
    again = {}
    for k in range(failed_at, failed_at + 3):
        data = rng.randbytes(MiB)
        err = _write(h, data, k * MiB)
        assert err is None, f"write {k} still fails ({err}) after space was freed"
        again[k] = data
    chunks.update(again)
    for k in range(4):
        assert h.pread(MiB, k * MiB) == bytes(MiB), f"trimmed chunk {k} is not zero"
    for k, data in chunks.items():
        assert h.pread(MiB, k * MiB) == data, f"chunk {k} after recovery"
    h.flush()
    # nothing was restarted: same processes, same device session
    assert backend.running and backend.pid == qsd_pid
    assert server.running and server.pid == nbdkit_pid
    close_handle(h)
    assert server.stop().status == 0, server.log_text()[-3000:]
    stats = server.stats()
    assert stats is not None
    assert stats["reconnects"] == 0 and stats["state"] == "connected", stats
    assert stats["totals"]["errors"] >= 1, f"the device reported no failed write: {stats}"

