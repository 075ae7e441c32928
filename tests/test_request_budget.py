"""What one 4 KiB request costs inside vblk_core, counted, not timed (issue 17's guard).

A device that completes every request inside the kick (a fake: no thread, no daemon) makes
the path deterministic: publish, kick, look, complete.  Counted per request: Python function
calls in vblk_core (sys.setprofile), lock acquisitions (every lock the block device creates
is a counting lock), and memory blocks left behind over 10,000 requests
(sys.getallocatedblocks).  The budget: at most 20 calls and 2 locks per read or write at
depth 1, and no growth.
"""
from __future__ import annotations

import _thread
import gc
import os
import random
import sys
import threading

import pytest

import vblk_core
from fake_ring_device import (
    QSD_FEATURES,
    BlkEmulator,
    FakeConfig,
    FakeRing,
    qsd_like_config,
)
from vblk_core.eventfd import EventfdKicker
from vblk_core.transport import Transport

CORE = os.path.dirname(os.path.abspath(vblk_core.__file__)) + os.sep
MAX_CALLS = 20
MAX_LOCKS = 2


class CountingLock:
    """threading.Lock with a count of acquisitions (shared by every instance made by
    vblk_core's code; the fake device's own locks are not the driver's cost)."""

    acquired = 0

    def __init__(self) -> None:
        self._lock = _thread.allocate_lock()
        self._counted = sys._getframe(1).f_code.co_filename.startswith(CORE)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._counted:
            CountingLock.acquired += 1
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _InlineKicker(EventfdKicker):
    """The driver's own eventfd kick, then the device serves the queue at once."""

    def __init__(self, fd: int, serve) -> None:
        super().__init__(fd)
        self._serve = serve

    def kick(self) -> None:
        super().kick()
        self._serve()


class InlineDevice(Transport):
    """A one-session fake virtio-blk device (qemu-storage-daemon's offer) that completes
    requests inside the kick."""

    target = "inline fake device"

    def __init__(self, disk: bytearray) -> None:
        self.disk = disk
        self.offer = FakeConfig(QSD_FEATURES, qsd_like_config(len(disk), 1), 1)
        self.kick_fds: list[int] = []
        self.rings: list[FakeRing] = []

    def connect(self) -> InlineDevice:
        return self

    def negotiate(self, driver_features: int) -> int:
        return self.offer.features & driver_features

    def read_config(self, size: int) -> bytes:
        return self.offer.config[:size]

    @property
    def max_queues(self) -> int:
        return 1

    def map_memory(self, memory) -> int:
        import mmap
        self._map = mmap.mmap(memory.fd, memory.size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = memory.user_addr
        return memory.user_addr

    def setup_queue(self, index, size, desc_addr, avail_addr, used_addr, call_fd):
        base = self._base
        ring = FakeRing(memoryview(self._map), size, desc_addr - base, avail_addr - base,
                        used_addr - base, base)
        self.rings.append(ring)
        emu = BlkEmulator(ring, self.disk)
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.kick_fds.append(fd)

        def serve() -> None:
            emu.serve_all()
            emu.log.clear()          # the emulator's own record would grow, not ours
            ring.set_avail_event(ring.last_avail)   # EVENT_IDX: kick me at the next one
        return _InlineKicker(fd, serve)

    def start(self) -> None:
        pass

    def loss_fd(self) -> int:
        return -1

    def loss_reason(self) -> str | None:
        return None

    def close(self) -> None:
        for fd in self.kick_fds:
            os.close(fd)
        self.kick_fds = []
        for ring in self.rings:
            ring.release()
            ring.mem.release()
        self.rings = []


@pytest.fixture
def device(monkeypatch):
    disk = bytearray(random.Random(5).randbytes(8 << 20))
    fake = InlineDevice(disk)
    with monkeypatch.context() as m:   # only the device's own locks count
        m.setattr(threading, "Lock", CountingLock)
        dev = vblk_core.BlockDevice.open(fake, num_queues=1, request_timeout=10)
    yield dev, disk
    dev.close()
    fake._map.close()


def cost(fn) -> tuple[int, int]:
    """(Python calls in vblk_core, lock acquisitions) of one call of ``fn``."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename.startswith(CORE):
            calls += 1

    locks = CountingLock.acquired
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls, CountingLock.acquired - locks


def test_one_4k_read_and_write_at_depth_1_stay_within_budget(device):
    dev, disk = device
    buf = bytearray(4096)
    data = random.Random(6).randbytes(4096)
    for _ in range(3):       # warm up: the thread's queue is chosen, slots touched
        dev.pread(buf, 0)
        dev.pwrite(data, 8192)
    read_calls, read_locks = cost(lambda: dev.pread(buf, 40960))
    write_calls, write_locks = cost(lambda: dev.pwrite(data, 81920))
    print(f"\n4 KiB read: {read_calls} calls, {read_locks} locks; "
          f"4 KiB write: {write_calls} calls, {write_locks} locks")
    assert bytes(buf) == bytes(disk[40960:45056])            # the device did the work
    assert bytes(disk[81920:86016]) == data
    assert read_calls <= MAX_CALLS and write_calls <= MAX_CALLS, (read_calls, write_calls)
    assert read_locks <= MAX_LOCKS and write_locks <= MAX_LOCKS, (read_locks, write_locks)
    st = dev.stats()["totals"]
    assert st["requests"] == 8 and st["kicks"] == 8


def test_10000_requests_leave_no_memory_behind(device):
    dev, disk = device
    buf = bytearray(4096)
    data = bytes(4096)
    for i in range(200):
        dev.pread(buf, 4096 * i)
        dev.pwrite(data, 4096 * i)
    gc.collect()
    before = sys.getallocatedblocks()
    for i in range(5000):
        dev.pread(buf, 4096 * (i % 2048))
        dev.pwrite(data, 4096 * (i % 2048))
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert grown < 50, f"{grown} blocks more after 10,000 requests"
    assert dev.stats()["totals"]["requests"] == 10400
