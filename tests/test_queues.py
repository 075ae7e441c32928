"""QueueRunner and its request slots (vblk_core/queues.py, slot.py) against the virtio-blk
emulator of fake_ring_device.py on the same memory: no sockets, no daemon.  One layer: the
queue runner (publishing, the reaper role, notifications, session end and resubmission)."""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from fake_ring_device import S_IOERR, S_UNSUPP, Behaviour, BlkEmulator, FakeRing
from vblk_core.datapath import DataPath
from vblk_core.errors import RequestError
from vblk_core.slot import RequestSlot
from vblk_core.virtio_blk import RequestType

GEN = 5


class _QueueOnlyTransport:
    """The one Transport method a QueueRunner calls; counts kicks."""

    def __init__(self):
        self.kicks = 0

    def setup_queue(self, index, size, desc_addr, avail_addr, used_addr, call_fd):
        return self

    def kick(self):
        self.kicks += 1


def device_would_signal(ring: FakeRing, old_used: int, event_idx: bool) -> bool:
    """What a conforming device decides after moving its used index from ``old_used``."""
    if event_idx:
        new = ring.used_idx
        return ((new - ring.used_event - 1) & 0xFFFF) < ((new - old_used) & 0xFFFF)
    return not ring.avail_flags & 1


class RunnerEnv:
    """One queue of a DataPath (its slots and region), attached to a stub transport; the
    test plays the device with ``ring``/``emu``.  Also the SessionGate (records losses)."""

    def __init__(self, queue_size=16, slots=4, buffer=64 << 10, size_max=0, policy=None,
                 spin_seconds=0.0, event_idx=False):
        self.lost_calls: list[tuple[str, int]] = []
        self.path = DataPath(1, queue_size, slots, buffer, size_max, 126, event_idx, 10.0,
                             self, spin_seconds)
        self.runner = self.path.queues[0]
        region = self.path.region
        self.runner.set_device_base(region.base_addr)
        self.transport = _QueueOnlyTransport()
        self.runner.attach(self.transport, GEN, self.lost)
        self.runner.start()
        self.ring = FakeRing.from_layout(region.view, 0, self.path.layout, region.base_addr)
        self.disk = bytearray(random.Random(1).randbytes(1 << 20))
        self.emu = BlkEmulator(self.ring, self.disk, policy)
        self.event_idx = event_idx

    # SessionGate
    def lost(self, reason, generation):
        self.lost_calls.append((reason, generation))

    def await_session(self, timeout):
        raise RequestError("no session in this test")

    def slot(self, req_type=RequestType.IN, sector=2, length=4096, segment=None,
             data=None) -> RequestSlot:
        s = self.runner.pool.take()
        assert s is not None, "no free slot"
        if data is not None:
            s.buf[:len(data)] = data
        s.type, s.sector, s.length, s.segment = req_type, sector, length, segment
        return s

    def put(self, s: RequestSlot) -> RequestSlot:
        assert self.runner.publish(s), "the queue has no session"
        return s

    def run(self, s: RequestSlot) -> RequestSlot:
        """Publish, let the device answer, wait; returns the finished slot."""
        self.put(s)
        assert self.emu.serve_all() == 1
        assert self.runner.wait(s, time.monotonic() + 5)
        assert s.finished
        return s

    def answer_later(self, delay, action):
        """The device's work on another thread after ``delay``, signalling the call eventfd
        only when the driver asked for it (as a conforming device does)."""
        def run():
            time.sleep(delay)
            old = self.ring.used_idx
            action()
            if device_would_signal(self.ring, old, self.event_idx):
                os.eventfd_write(self.runner.call_fd, 1)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    def close(self):
        self.runner.detach()
        self.ring.release()
        self.path.close()


@pytest.fixture
def env():
    envs = []

    def make(**kw):
        e = RunnerEnv(**kw)
        envs.append(e)
        return e

    yield make
    for e in envs:
        e.close()


def test_read_and_write_through_a_slot(env):
    e = env()
    s = e.run(e.slot(sector=3, length=8192))
    s.check()
    assert bytes(s.buf[:8192]) == bytes(e.disk[3 * 512:3 * 512 + 8192])
    e.runner.pool.give_back(s)
    w = e.run(e.slot(RequestType.OUT, 100, 1024, data=b"\xA5" * 1024))
    w.check()
    assert e.disk[100 * 512:100 * 512 + 1024] == b"\xA5" * 1024
    st = e.runner.stats
    assert (st.requests, st.errors, st.bytes, st.depth, st.kicks) == (2, 0, 8192 + 1024, 0, 2)
    assert e.transport.kicks == 2


def test_chain_shapes_and_fixed_heads(env):
    e = env(slots=4)
    slots = [e.slot(RequestType.IN, 9, 4096), e.slot(RequestType.OUT, 1, 512),
             e.slot(RequestType.FLUSH, 0, 0), e.slot(RequestType.DISCARD, 0, 0, (64, 8, 0))]
    for s in slots:
        e.put(s)
    reqs = [e.emu.parse(c) for c in e.ring.pop_all()]
    shapes = [[(d.len, d.writable) for d in r.chain.descs] for r in reqs]
    assert shapes == [[(16, False), (4096, True), (1, True)],
                      [(16, False), (512, False), (1, True)],
                      [(16, False), (1, True)],
                      [(16, False), (16, False), (1, True)]]
    assert [(r.type, r.sector) for r in reqs] == [(0, 9), (1, 1), (4, 0), (11, 0)]
    assert reqs[3].segment == (64, 8, 0)
    assert [r.chain.head for r in reqs] == [s.head for s in slots]
    assert [s.head for s in slots] == [0, 3, 6, 9]          # chains of 3, fixed per slot
    assert reqs[0].data[0].addr == slots[0].buf_addr
    for r in reqs:      # the status byte is preset to 0xFF before the device sees it
        assert e.ring.read(r.status.addr, 1) == b"\xff"
    # after a flush or a discard, the slot's next read has the common shape again
    for c in reqs:
        e.emu.serve(c.chain)
    for s in slots:
        assert e.runner.wait(s, time.monotonic() + 5)
        e.runner.pool.give_back(s)
    again = [e.put(e.slot(RequestType.IN, 1, 512)) for _ in range(4)]
    assert all([(d.len, d.writable) for d in e.emu.parse(c).chain.descs]
               == [(16, False), (512, True), (1, True)] for c in e.ring.pop_all())
    assert sorted(s.head for s in again) == [0, 3, 6, 9]


def test_data_split_at_size_max(env):
    e = env(size_max=4096, slots=2, buffer=16384)
    s = e.put(e.slot(RequestType.IN, 0, 9728))
    (chain,) = e.ring.pop_all()
    assert [(d.addr - s.buf_addr, d.len, d.writable) for d in chain.descs[1:-1]] == [
        (0, 4096, True), (4096, 4096, True), (8192, 9728 - 8192, True)]
    assert s.head == 0 and e.runner.slots[1].head == 6      # 4 data descriptors a slot


def test_no_free_slot_and_no_session(env):
    e = env(slots=2)
    a, b = e.slot(RequestType.FLUSH, 0, 0), e.slot(RequestType.FLUSH, 0, 0)
    assert e.runner.pool.take() is None                           # both slots taken
    e.put(a)
    e.put(b)
    assert len(e.ring.pop_all()) == 2
    survivors = e.runner.detach()
    assert survivors == [a, b] and not a.finished
    assert not e.runner.publish(a)                           # no session now
    assert e.runner.stats.depth == 0


@pytest.mark.parametrize("used_len", [0, 1, 100, 4096])
def test_short_read_is_eio(env, used_len):
    e = env(policy=lambda r: Behaviour(used_len=used_len) if r.type == 0 else None)
    s = e.run(e.slot())
    with pytest.raises(RequestError, match="short read") as info:
        s.check()
    assert info.value.errno == errno.EIO
    assert e.runner.stats.errors == 1 and e.runner.stats.bytes == 0


@pytest.mark.parametrize("status,err", [(S_IOERR, errno.EIO), (S_UNSUPP, errno.EOPNOTSUPP),
                                        (3, errno.EPROTO), (0xFF, errno.EPROTO)])
def test_bad_status(env, status, err):
    e = env(policy=lambda r: Behaviour(status=status))
    for s in (e.slot(), e.slot(RequestType.FLUSH, 0, 0)):
        e.run(s)
        with pytest.raises(RequestError) as info:
            s.check()
        assert info.value.errno == err
    assert e.runner.stats.errors == 2


def test_status_never_written_is_an_error(env):
    """The slot held OK (0) from the previous request: a device that does not write the status
    must not make the next request on that slot look successful."""
    silent = {"on": False}
    e = env(slots=1, policy=lambda r: Behaviour(write_status=False) if silent["on"] else None)
    s = e.run(e.slot(RequestType.FLUSH, 0, 0))
    s.check()
    assert e.ring.read(e.emu.log[-1].status.addr, 1) == b"\x00"
    e.runner.pool.give_back(s)
    silent["on"] = True
    again = e.run(e.slot(RequestType.FLUSH, 0, 0))
    assert again is s                                        # the same slot, reused
    with pytest.raises(RequestError) as info:
        again.check()
    assert info.value.errno == errno.EPROTO


def test_wait_reaps_when_the_device_signals(env):
    e = env()
    s = e.put(e.slot(sector=5, length=2048))
    t = e.answer_later(0.05, e.emu.serve_all)
    assert e.runner.wait(s, time.monotonic() + 5) is True
    t.join()
    s.check()
    assert bytes(s.buf[:2048]) == bytes(e.disk[5 * 512:5 * 512 + 2048])
    assert e.runner.stats.calls == 1 and not e.runner.reaper_busy


def test_wait_times_out_when_the_device_is_silent(env):
    e = env()
    s = e.put(e.slot())
    t0 = time.monotonic()
    assert e.runner.wait(s, t0 + 0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 3
    assert not s.finished and not e.runner.reaper_busy and e.runner.sleeping_waiters == 1
    e.emu.serve_all()                     # the device answers late: the next wait completes it
    e.runner.detach()                     # (a lost session ends with what the device finished)
    assert s.finished
    assert e.runner.wait(s, time.monotonic() + 1) is True
    s.check()


def test_several_waiters_one_reaper(env):
    """The first publisher becomes the reaper; its request completes first, so it hands the
    role to the oldest sleeper, or the others would sleep through their completions."""
    e = env(queue_size=32, slots=6)
    slots = [e.put(e.slot(sector=8 * i, length=512)) for i in range(6)]
    assert slots[0].reaper and e.runner.sleeping_waiters == 5
    chains = e.ring.pop_all()
    results = {}

    def waiter(i):
        results[i] = e.runner.wait(slots[i], time.monotonic() + 10)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    t0 = time.monotonic()
    e.answer_later(0.02, lambda: e.emu.serve(chains[0]))          # the reaper's own request
    threads[0].join(5)
    assert results.get(0) is True
    assert slots[1].reaper or slots[1].finished                     # handed to the oldest
    e.answer_later(0.02, lambda: [e.emu.serve(c) for c in reversed(chains[1:])]).join()
    for th in threads:
        th.join(10)
    assert results == {i: True for i in range(6)}
    assert time.monotonic() - t0 < 2.5, "completions waited for a timeout instead of a reaper"
    for i, s in enumerate(slots):
        s.check()
        assert bytes(s.buf[:512]) == bytes(e.disk[8 * i * 512:8 * i * 512 + 512])
    assert e.runner.stats.requests == 6 and e.runner.stats.depth == 0
    assert not e.runner.reaper_busy and not e.runner.sleeping_waiters


def test_broken_ring_is_reported_and_stops_the_queue(env):
    e = env()
    good = e.put(e.slot(RequestType.FLUSH, 0, 0))
    bad = e.put(e.slot(RequestType.FLUSH, 0, 0))
    c1, c2 = e.ring.pop_all()

    def device():
        e.emu.serve(c1)
        e.ring.push(c2.head, 5)  # 5 bytes "written" into a 1-byte status
    e.answer_later(0.02, device)
    assert e.runner.wait(good, time.monotonic() + 5)
    good.check()
    assert e.runner.wait(bad, time.monotonic() + 0.5) is False
    assert e.lost_calls and all(g == GEN and "bytes written" in r for r, g in e.lost_calls)
    assert not e.runner.publish(e.slot(RequestType.FLUSH, 0, 0))   # nothing more published
    assert e.runner.detach() == [bad] and not bad.finished


def test_detach_then_resubmit_completes_the_sleeping_owner(env):
    """What the device completed before the session ended is finished (not run again); the
    rest comes back, is published again on the next session, and its sleeping owner (handed
    the reaper role) completes it."""
    e = env()
    done = e.put(e.slot(RequestType.FLUSH, 0, 0))
    pending = e.put(e.slot(sector=7, length=1024))
    e.emu.serve(e.ring.pop())                 # only the first
    result = {}
    owner = threading.Thread(target=lambda: result.setdefault(
        "ok", e.runner.wait(pending, time.monotonic() + 10)))
    owner.start()
    assert e.runner.wait(done, time.monotonic() + 5)
    time.sleep(0.05)
    survivors = e.runner.detach()
    assert survivors == [pending] and done.finished and not pending.finished
    e.ring.last_avail = e.ring.used_idx = 0   # the device's side of the new session
    e.runner.attach(e.transport, GEN + 1, e.lost)
    e.runner.start()
    assert e.runner.resubmit(survivors) == []
    e.answer_later(0.02, e.emu.serve_all)
    owner.join(10)
    assert result == {"ok": True} and pending.generation == GEN + 1
    pending.check()
    assert bytes(pending.buf[:1024]) == bytes(e.disk[7 * 512:7 * 512 + 1024])


@pytest.mark.parametrize("event_idx", [True, False])
def test_notifications_off_while_the_reaper_spins_on_before_it_sleeps(env, event_idx):
    """A lone request spins with device notifications off (a completion then leaves no
    signal behind); without spinning the reaper sleeps with them on."""
    e = env(spin_seconds=5.0, event_idx=event_idx)
    s = e.put(e.slot())
    old = e.ring.used_idx
    assert not device_would_signal_after_one(e)            # off: the reaper is looking
    t = threading.Thread(target=lambda: (time.sleep(0.01), e.emu.serve_all()), daemon=True)
    t.start()
    assert e.runner.wait(s, time.monotonic() + 5)
    t.join()
    assert not device_would_signal(e.ring, old, event_idx)
    assert e.runner.stats.spin_hits == 1 and e.runner.stats.calls == 0
    e.runner.pool.give_back(s)
    quiet = env(spin_seconds=0.0, event_idx=event_idx)
    quiet.put(quiet.slot())
    assert device_would_signal_after_one(quiet)            # on: the reaper will sleep


def device_would_signal_after_one(e: RunnerEnv) -> bool:
    """Whether a completion pushed now would be signalled (without consuming it)."""
    old = e.ring.used_idx
    e.ring.used_idx = (old + 1) & 0xFFFF
    try:
        return device_would_signal(e.ring, old, e.event_idx)
    finally:
        e.ring.used_idx = old


@pytest.mark.parametrize("spin", [0.0, 5.0])
def test_lone_request_spins_on_the_used_ring(env, spin):
    """At depth 1 the reaper watches the used ring before sleeping: a completion the device
    makes without signalling is found by spinning (no call, no sleep)."""
    e = env(spin_seconds=spin)
    s = e.put(e.slot())

    def device():
        time.sleep(0.01)
        assert e.emu.serve_all() == 1       # no call eventfd write: only a spinner sees it
    t = threading.Thread(target=device, daemon=True)
    t.start()
    assert e.runner.wait(s, time.monotonic() + 5) is True
    t.join()
    s.check()
    assert e.runner.stats.calls == 0
    assert e.runner.stats.spin_hits == (1 if spin else 0)


def test_detach_survives_a_call_eventfd_the_device_filled(env):
    """The device holds our call eventfd and may push its counter to the maximum: waking the
    reaper at detach must not fail (a full counter wakes it anyway)."""
    e = env()
    s = e.put(e.slot())                     # its owner holds the reaper role, not yet waiting
    os.eventfd_write(e.runner.call_fd, 0xFFFFFFFFFFFFFFFE)   # full: one more write would block
    detached = {}
    ender = threading.Thread(target=lambda: detached.setdefault("s", e.runner.detach()))
    ender.start()
    time.sleep(0.1)                         # detach has tried to wake the reaper by now
    result = {}
    owner = threading.Thread(target=lambda: result.setdefault(
        "ok", e.runner.wait(s, time.monotonic() + 10)))
    owner.start()                           # the owner reaps, sees the session over, leaves
    ender.join(5)
    assert detached == {"s": [s]} and not e.runner.reaper_busy
    e.runner.fail(s, RequestError("session over"))
    owner.join(5)
    assert result == {"ok": True}
    with pytest.raises(RequestError, match="session over"):
        s.check()


def test_a_taker_waits_for_a_slot_and_is_woken_when_one_comes_back(env):
    """With every slot taken, a taker sleeps in pool.wait() until a slot is given back (or a
    completion frees one), not for its whole timeout."""
    e = env(slots=1)
    s = e.slot(RequestType.FLUSH, 0, 0)
    assert e.runner.pool.take() is None and e.runner.pool.in_use == 1
    woke = {}

    def taker():
        t0 = time.monotonic()
        e.runner.pool.wait(10)
        woke["after"] = time.monotonic() - t0
        woke["slot"] = e.runner.pool.take()
    t = threading.Thread(target=taker)
    t.start()
    deadline = time.monotonic() + 5
    while not e.runner.pool.waiters and time.monotonic() < deadline:
        time.sleep(0.001)
    assert e.runner.pool.waiters == 1
    e.runner.pool.give_back(s)
    t.join(10)
    assert woke["slot"] is s and woke["after"] < 5
    assert e.runner.pool.high_water == 1
