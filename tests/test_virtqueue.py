"""The split virtqueue, QueueRunner/BlockRequest and BlockDevice's data path, against the fake
device side in fake_ring_device.py (same memory, no sockets, no daemon)."""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

import vblk_core
from fake_ring_device import (
    F_NEXT,
    F_WRITE,
    QSD_FEATURES,
    S_IOERR,
    S_UNSUPP,
    USED_F_NO_NOTIFY,
    Behaviour,
    BlkEmulator,
    FakeConfig,
    FakeRing,
    FakeVhostBackend,
    qsd_like_config,
)
from vblk_core.errors import RequestError, RingError
from vblk_core.layout import VirtqueueLayout
from vblk_core.memory import SharedRegion
from vblk_core.queues import QueueRunner
from vblk_core.request import BlockRequest
from vblk_core.virtio import VirtioFeature
from vblk_core.virtio_blk import RequestType, VirtioBlkReqSlot
from vblk_core.virtqueue import Virtqueue

VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT = RequestType.IN, RequestType.OUT
VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_DISCARD = RequestType.FLUSH, RequestType.DISCARD

GUEST = 0x7F0000100000  # any 16-aligned guest address for mem[0]


def make_queue(size: int, event_idx: bool = False, data: int = 1 << 16):
    lay = VirtqueueLayout.new(1, size, VirtioBlkReqSlot)
    mem = memoryview(bytearray(lay.end_offset + data))
    vq = Virtqueue(mem, 0, lay, GUEST, 8, event_idx)
    ring = FakeRing.from_layout(mem, 0, lay, GUEST)
    return vq, ring, GUEST + lay.end_offset


# --- publishing chains -------------------------------------------------------------------------

def test_chain_published_correctly():
    vq, ring, data = make_queue(8)
    segs = [(data, 16, False), (data + 512, 4096, True), (data + 8192, 1, True)]
    head = vq.add_chain(segs)
    assert ring.avail_idx == 1 and vq.num_free == 5 and vq.in_flight == 3
    (chain,) = ring.pop_all()
    assert chain.head == head
    got = [(d.addr, d.len, bool(d.flags & F_WRITE)) for d in chain.descs]
    assert got == segs
    # NEXT on all but the last; next indices distinct and in range
    assert [bool(d.flags & F_NEXT) for d in chain.descs] == [True, True, False]
    assert all(d.flags & ~(F_NEXT | F_WRITE) == 0 for d in chain.descs)
    assert len({d.index for d in chain.descs}) == 3
    assert chain.writable_bytes == 4097
    # a second chain uses other descriptors and the next avail slot
    head2 = vq.add_chain([(data + 16, 16, False)])
    (chain2,) = ring.pop_all()
    assert chain2.head == head2 and head2 not in {d.index for d in chain.descs}
    assert (chain2.descs[0].addr, chain2.descs[0].len, chain2.descs[0].flags) == (data + 16, 16, 0)


def test_add_chain_rejects_empty_and_oversized():
    vq, ring, data = make_queue(4)
    with pytest.raises(ValueError):
        vq.add_chain([])
    vq.add_chain([(data, 1, False)] * 3)
    with pytest.raises(ValueError):
        vq.add_chain([(data, 1, False)] * 2)
    assert vq.num_free == 1 and ring.avail_idx == 1  # the failed call published nothing
    vq.add_chain([(data, 1, False)])
    assert vq.num_free == 0 and ring.avail_idx == 2


@pytest.mark.parametrize("size", [1, 2, 8, 16])
def test_free_list_reuse_model(size):
    """Random chains completed in random order: in-flight chains never share a descriptor, the
    device sees exactly what was published, and every descriptor comes back."""
    rnd = random.Random(size)
    vq, ring, data = make_queue(size)
    in_flight: dict[int, tuple[list, set[int]]] = {}   # head -> (segments, descriptor indices)
    seen_heads = set()
    for _step in range(3000):
        if in_flight and (vq.num_free == 0 or rnd.random() < 0.45):
            # the device completes one random chain (out of order)
            head = rnd.choice(list(in_flight))
            segs, _ = in_flight.pop(head)
            writable = sum(n for _, n, w in segs if w)
            ring.push(head, writable)
            assert vq.harvest() == [(head, writable)]
        else:
            n = rnd.randint(1, min(4, vq.num_free))
            segs = [(data + 64 * rnd.randrange(256), rnd.randint(1, 4096), rnd.random() < 0.5)
                    for _ in range(n)]
            head = vq.add_chain(segs)
            (chain,) = ring.pop_all()
            assert chain.head == head
            assert [(d.addr, d.len, d.writable) for d in chain.descs] == segs
            idx = {d.index for d in chain.descs}
            for _, other in in_flight.values():
                assert not idx & other, "a descriptor was handed out twice"
            in_flight[head] = (segs, idx)
            seen_heads.add(head)
        assert vq.num_free == size - sum(len(s) for s, _ in in_flight.values())
    for head in in_flight:
        ring.push(head, 0)
    assert sorted(h for h, _ in vq.harvest()) == sorted(in_flight)
    assert vq.num_free == size
    assert seen_heads == set(range(size))  # every descriptor served as a head at some point


def test_wraparound_of_16_bit_indices():
    """More than 65536 requests through a 4-entry queue."""
    vq, ring, data = make_queue(4)
    total = 70_003
    done = 0
    seq = 0
    while done < total:
        batch = []
        while vq.num_free and seq < total:
            n = 1 + (seq % 2) if vq.num_free >= 2 else 1
            head = vq.add_chain([(data + (seq % 1000) * 8, n, True)] * n)
            batch.append((head, seq, n))
            seq += 1
        chains = ring.pop_all()
        assert [c.head for c in chains] == [h for h, _, _ in batch]
        for c, (_, s, n) in zip(chains, batch, strict=False):
            assert c.descs[0].addr == data + (s % 1000) * 8 and len(c.descs) == n
        for c in reversed(chains):  # complete in reverse order
            ring.push(c.head, c.writable_bytes, publish=False)
        ring.publish()
        got = vq.harvest()
        assert got == [(c.head, c.writable_bytes) for c in reversed(chains)]
        done += len(got)
    assert vq.avail_idx == total & 0xFFFF == ring.last_avail
    assert vq.last_used_idx == total & 0xFFFF == ring.used_idx
    assert vq.num_free == 4 and not vq.has_used()


# --- notifications -----------------------------------------------------------------------------

def _need_event_reference(event: int, new: int, old: int) -> bool:
    """The device wants a kick iff avail_event is one of the indices published since old."""
    return event in {(old + i) & 0xFFFF for i in range((new - old) & 0xFFFF)}


def test_needs_kick_event_idx_against_reference():
    rnd = random.Random(7)
    vq, ring, data = make_queue(8, event_idx=True)
    assert not vq.needs_kick()  # nothing published
    published = 0
    kicks = 0
    while published < 70_000:
        old = vq.avail_idx
        ring.set_avail_event(old + rnd.randint(-2, 10))
        heads = [vq.add_chain([(data, 1, True)]) for _ in range(rnd.randint(1, 8))]
        published += len(heads)
        want = _need_event_reference(ring.avail_event, vq.avail_idx, old)
        got = vq.needs_kick()
        assert got == want, (old, vq.avail_idx)
        kicks += got
        assert not vq.needs_kick()  # nothing new since the last decision
        ring.pop_all()
        for h in heads:
            ring.push(h, 1)
        vq.harvest()
    assert 0 < kicks < published // 2


def test_needs_kick_event_idx_simple_cases():
    vq, ring, data = make_queue(8, event_idx=True)
    ring.set_avail_event(0)
    vq.add_chain([(data, 1, True)])
    assert vq.needs_kick()               # 0 in [0, 1)
    ring.set_avail_event(5)
    vq.add_chain([(data, 1, True)])
    vq.add_chain([(data, 1, True)])
    assert not vq.needs_kick()           # 5 not in [1, 3)
    for _ in range(3):
        vq.add_chain([(data, 1, True)])
    assert vq.needs_kick()               # 5 in [3, 6)


def test_needs_kick_without_event_idx_follows_no_notify():
    vq, ring, data = make_queue(8)
    vq.add_chain([(data, 1, True)])
    assert vq.needs_kick()
    ring.set_used_flags(USED_F_NO_NOTIFY)
    vq.add_chain([(data, 1, True)])
    assert not vq.needs_kick()
    ring.set_used_flags(0)
    vq.add_chain([(data, 1, True)])
    assert vq.needs_kick()
    assert not vq.needs_kick()


def test_enable_interrupts():
    vq, ring, data = make_queue(8, event_idx=True)
    for _ in range(3):
        ring.push(vq.add_chain([(data, 1, True)]), 1)
    vq.harvest()
    vq.enable_interrupts()
    assert ring.used_event == 3
    vq2, ring2, _ = make_queue(8)
    ring2.mem[ring2.avail_off] = 1  # NO_INTERRUPT
    vq2.enable_interrupts()
    assert ring2.avail_flags == 0


def test_has_used():
    vq, ring, data = make_queue(4)
    head = vq.add_chain([(data, 1, True)])
    assert not vq.has_used()
    ring.push(head, 1)
    assert vq.has_used()
    vq.harvest()
    assert not vq.has_used()
    assert vq.harvest() == []


# --- a hostile device --------------------------------------------------------------------------

def _three_requests(vq):
    """Three chains: A (3 descriptors, 513 writable), B (1 readable), C (2 descriptors)."""
    base = GUEST + vq.layout.end_offset
    a = vq.add_chain([(base, 16, False), (base + 512, 512, True), (base + 16, 1, True)])
    b = vq.add_chain([(base + 32, 16, False)])
    c = vq.add_chain([(base + 48, 16, False), (base + 64, 1, True)])
    return a, b, c


def _assert_device_error(vq, completed, match):
    with pytest.raises(RingError, match=match) as info:
        vq.harvest()
    assert info.value.completed == completed
    return info.value


def _assert_reusable(vq, ring):
    """After a DeviceError, reset() gives a clean queue that works again."""
    vq.reset()
    ring.last_avail = ring.used_idx = 0
    assert vq.num_free == vq.size and not vq.has_used()
    heads = [vq.add_chain([(GUEST + vq.layout.end_offset, 1, True)]) for _ in range(vq.size)]
    assert sorted(heads) == list(range(vq.size))
    assert [c.head for c in ring.pop_all()] == heads
    for h in heads:
        ring.push(h, 1)
    assert len(vq.harvest()) == vq.size


@pytest.mark.parametrize("bad_id", [8, 9, 1000, 0xFFFFFFFF])
def test_used_id_out_of_range(bad_id):
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 513, publish=False)
    ring.push(bad_id, 0)
    _assert_device_error(vq, [(a, 513)], "not an in-flight request head")
    assert vq.num_free == 8 - 3  # A's three descriptors came back, B and C still in flight
    assert vq.last_used_idx == 1
    _assert_reusable(vq, ring)


def test_used_id_not_in_flight():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    # a descriptor inside A's chain, not its head; then a never-used descriptor
    inner = ring.pop().descs[1].index
    ring.push(b, 0, publish=False)
    ring.push(inner, 0)
    _assert_device_error(vq, [(b, 0)], "not an in-flight")
    vq2, ring2, _ = make_queue(8)
    _three_requests(vq2)
    ring2.push(7, 0)
    _assert_device_error(vq2, [], "not an in-flight")
    assert vq2.num_free == 2


def test_same_id_completed_twice():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(c, 1, publish=False)
    ring.push(c, 1)
    _assert_device_error(vq, [(c, 1)], "not an in-flight")
    # and across two harvests
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 1)
    assert vq.harvest() == [(a, 1)]
    ring.push(a, 1)
    _assert_device_error(vq, [], "not an in-flight")


@pytest.mark.parametrize("which,length", [("a", 514), ("b", 1), ("c", 2), ("a", 0x80000000)])
def test_length_beyond_writable_bytes(which, length):
    vq, ring, _ = make_queue(8)
    heads = dict(zip("abc", _three_requests(vq), strict=False))
    first = heads["c"] if which != "c" else heads["b"]
    ring.push(first, 0, publish=False)
    ring.push(heads[which], length)
    _assert_device_error(vq, [(first, 0)], "bytes written")
    # the exact limit is fine
    vq, ring, _ = make_queue(8)
    heads = dict(zip("abc", _three_requests(vq), strict=False))
    ring.push(heads[which], {"a": 513, "b": 0, "c": 1}[which])
    assert len(vq.harvest()) == 1


def test_used_idx_jumps_beyond_in_flight():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)        # 3 requests, 6 descriptors in flight
    ring.set_used_idx(7)
    _assert_device_error(vq, [], "moved the used index")
    assert vq.num_free == 2 and vq.last_used_idx == 0
    _assert_reusable(vq, ring)
    # a jump past the number of requests (but not descriptors) in flight: the extra entries are
    # stale and must not be believed
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 0, publish=False)
    ring.push(b, 0, publish=False)
    ring.push(c, 0, publish=False)
    ring.set_used_idx(4)
    err = _assert_device_error(vq, [(a, 0), (b, 0), (c, 0)], "")
    assert vq.num_free == 8
    assert isinstance(err, vblk_core.VblkError)


def test_used_idx_backwards_is_an_error():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 0)
    vq.harvest()
    ring.set_used_idx(0)  # moves "forward" by 65535
    _assert_device_error(vq, [], "moved the used index")


# --- QueueRunner and BlockRequest with the virtio-blk emulator ---------------------------------

GEN = 5
DATA_SIZE = 1 << 20


class _QueueOnlyTransport:
    """The one Transport method a QueueRunner calls; records the call and counts kicks."""

    def __init__(self):
        self.setups = []
        self.kicks = 0

    def setup_queue(self, index, size, desc_addr, avail_addr, used_addr, call_fd):
        self.setups.append((index, size, desc_addr, avail_addr, used_addr, call_fd))
        return self

    def kick(self):
        self.kicks += 1


class RunnerEnv:
    def __init__(self, queue_size=16, size_max=0, policy=None, spin_seconds=0.0):
        lay = VirtqueueLayout.new(1, queue_size, VirtioBlkReqSlot)
        self.region = SharedRegion(lay.end_offset + DATA_SIZE)
        self.data_off = -(-lay.end_offset // 4096) * 4096
        self.vq = Virtqueue(self.region.view, 0, lay, self.region.base_addr, 8, False)
        self.broken: list[tuple[str, int]] = []
        self.broken_event = threading.Event()
        self.runner = QueueRunner(0, self.vq, size_max, self._on_broken, spin_seconds)
        self.transport = _QueueOnlyTransport()
        self.runner.attach(self.transport, GEN)
        self.ring = FakeRing.from_layout(self.region.view, 0, lay, self.region.base_addr)
        self.disk = bytearray(random.Random(1).randbytes(1 << 20))
        self.emu = BlkEmulator(self.ring, self.disk, policy)

    def _on_broken(self, reason, generation):
        self.broken.append((reason, generation))
        self.broken_event.set()

    def addr(self, off=0):
        return self.region.base_addr + self.data_off + off

    def view(self, off, n):
        return bytes(self.region.view[self.data_off + off:self.data_off + off + n])

    def publish(self, req, generation=GEN):
        return self.runner.submit(req, generation)

    def put(self, req):
        assert self.publish(req) is True, "the ring had no room"

    def run(self, req):
        """Publish, let the device answer, reap; returns the request (done)."""
        assert self.publish(req) is True
        assert self.emu.serve_all() == 1
        assert self.runner.reap() is None
        assert req.finished and req.done.acquire(timeout=0), "request not completed"
        return req

    def close(self):
        self.runner.detach()
        self.ring.release()
        self.vq.release()
        self.region.close()


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


def read_req(env, sector=2, length=4096, off=0):
    return BlockRequest(VIRTIO_BLK_T_IN, sector, env.addr(off), length, True)


def test_runner_read_write_ok(env):
    e = env()
    req = e.run(read_req(e, sector=3, length=8192))
    req.check()
    assert e.view(0, 8192) == bytes(e.disk[3 * 512:3 * 512 + 8192])
    e.region.view[e.data_off:e.data_off + 1024] = b"\xA5" * 1024
    w = e.run(BlockRequest(VIRTIO_BLK_T_OUT, 100, e.addr(), 1024, False))
    w.check()
    assert e.disk[100 * 512:100 * 512 + 1024] == b"\xA5" * 1024
    s = e.runner.stats
    assert (s.requests, s.errors, s.bytes, s.depth) == (2, 0, 8192 + 1024, 0)
    assert s.kicks == 2


def test_runner_chain_shapes(env):
    e = env()
    e.put(read_req(e, sector=9, length=4096))
    e.put(BlockRequest(VIRTIO_BLK_T_OUT, 1, e.addr(), 512, False))
    e.put(BlockRequest(VIRTIO_BLK_T_FLUSH, 0))
    e.put(BlockRequest(VIRTIO_BLK_T_DISCARD, 0, segment=(64, 8, 0)))
    reqs = [e.emu.parse(c) for c in e.ring.pop_all()]
    shapes = [[(d.len, d.writable) for d in r.chain.descs] for r in reqs]
    assert shapes == [[(16, False), (4096, True), (1, True)],
                      [(16, False), (512, False), (1, True)],
                      [(16, False), (1, True)],
                      [(16, False), (16, False), (1, True)]]
    assert [(r.type, r.sector) for r in reqs] == [(0, 9), (1, 1), (4, 0), (11, 0)]
    assert reqs[3].segment == (64, 8, 0)
    assert reqs[0].data[0].addr == e.addr()
    # the status byte is preset to 0xFF before the device sees it
    for r in reqs:
        assert e.ring.read(r.status.addr, 1) == b"\xff"


def test_runner_splits_data_at_size_max(env):
    e = env(size_max=4096)
    req = BlockRequest(VIRTIO_BLK_T_IN, 0, e.addr(), 10000 // 512 * 512, True)
    assert req.descriptor_count(4096) == 2 + 3
    e.put(req)
    (chain,) = e.ring.pop_all()
    data = chain.descs[1:-1]
    assert [(d.addr - e.addr(), d.len, d.writable) for d in data] == [
        (0, 4096, True), (4096, 4096, True), (8192, 9728 - 8192, True)]


def test_runner_full_and_wrong_generation(env):
    e = env(queue_size=4)
    assert e.publish(BlockRequest(VIRTIO_BLK_T_FLUSH, 0)) is True   # 2 descriptors
    assert e.publish(read_req(e)) is False                          # needs 3, 2 free
    assert e.publish(BlockRequest(VIRTIO_BLK_T_FLUSH, 0)) is True
    assert e.publish(BlockRequest(VIRTIO_BLK_T_FLUSH, 0)) is False
    assert e.publish(BlockRequest(VIRTIO_BLK_T_FLUSH, 0), generation=GEN + 1) is None
    assert len(e.ring.pop_all()) == 2
    survivors = e.runner.detach()
    assert len(survivors) == 2 and all(r.type == VIRTIO_BLK_T_FLUSH for r in survivors)
    assert e.vq.num_free == 4


@pytest.mark.parametrize("used_len", [0, 1, 100, 4096])
def test_short_read_is_eio(env, used_len):
    e = env(policy=lambda r: Behaviour(used_len=used_len) if r.type == 0 else None)
    req = e.run(read_req(e))
    with pytest.raises(RequestError, match="short read") as info:
        req.check()
    assert info.value.errno == errno.EIO
    assert e.runner.stats.errors == 1 and e.runner.stats.bytes == 0


@pytest.mark.parametrize("status,err", [(S_IOERR, errno.EIO), (S_UNSUPP, errno.EOPNOTSUPP),
                                        (3, errno.EPROTO), (0x7F, errno.EPROTO),
                                        (0xFF, errno.EPROTO)])
def test_bad_status(env, status, err):
    e = env(policy=lambda r: Behaviour(status=status))
    for req in (read_req(e), BlockRequest(VIRTIO_BLK_T_FLUSH, 0)):
        e.run(req)
        with pytest.raises(RequestError) as info:
            req.check()
        assert info.value.errno == err
    assert e.runner.stats.errors == 2


def test_status_never_written_is_an_error(env):
    """The slot held OK (0) from the previous request: a device that does not write the status
    must not make the next request on that slot look successful."""
    silent = {"on": False}
    e = env(policy=lambda r: Behaviour(write_status=False) if silent["on"] else None)
    first = e.run(BlockRequest(VIRTIO_BLK_T_FLUSH, 0))
    first.check()
    head = e.emu.log[-1].chain.head
    assert e.ring.read(e.emu.log[-1].status.addr, 1) == b"\x00"
    silent["on"] = True
    second = e.run(BlockRequest(VIRTIO_BLK_T_FLUSH, 0))
    assert e.emu.log[-1].chain.head == head  # same slot reused
    with pytest.raises(RequestError) as info:
        second.check()
    assert info.value.errno == errno.EPROTO
    third = e.run(read_req(e))
    with pytest.raises(RequestError):
        third.check()


def test_reap_stops_at_a_broken_entry(env):
    e = env()
    good = read_req(e)
    bad = BlockRequest(VIRTIO_BLK_T_FLUSH, 0)
    e.put(good)
    e.put(bad)
    c1, c2 = e.ring.pop_all()
    e.emu.serve(c1)
    e.ring.push(c2.head + 40, 1)
    reason = e.runner.reap()
    assert reason and "queue 0" in reason
    assert good.finished and good.done.acquire(timeout=0)
    good.check()
    assert not bad.finished and not bad.done.acquire(timeout=0)
    assert e.runner.in_flight() == [bad]


def _answer_later(e, delay, action):
    """Run ``action`` (the device's work) on another thread after ``delay``, then signal the
    call eventfd, as a back-end would."""
    def run():
        time.sleep(delay)
        action()
        os.eventfd_write(e.runner.call_fd, 1)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_wait_reaps_when_the_device_signals(env):
    e = env()
    e.runner.start()
    req = read_req(e, sector=5, length=2048)
    e.put(req)
    t = _answer_later(e, 0.05, e.emu.serve_all)
    assert e.runner.wait(req, 5) is True
    t.join()
    assert req.finished
    req.check()
    assert e.view(0, 2048) == bytes(e.disk[5 * 512:5 * 512 + 2048])
    assert e.runner.stats.calls >= 1 and not e.runner.reaper_busy


def test_wait_times_out_when_the_device_is_silent(env):
    e = env()
    e.runner.start()
    req = read_req(e)
    e.put(req)
    t0 = time.monotonic()
    assert e.runner.wait(req, 0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 3
    assert not req.finished and not e.runner.reaper_busy
    # the device answers late: the next wait completes it
    e.emu.serve_all()
    assert e.runner.wait(req, 5) is True
    req.check()


def test_several_waiters_one_reaper(env):
    """Thread 0 becomes the reaper; its request completes first, so it must hand the role to
    a waiter, or the others would sleep through their completions."""
    e = env(queue_size=32)
    e.runner.start()
    reqs = [read_req(e, sector=8 * i, length=512, off=512 * i) for i in range(6)]
    for r in reqs:
        e.put(r)
    chains = e.ring.pop_all()
    assert len(chains) == 6
    results = {}

    def waiter(i):
        results[i] = e.runner.wait(reqs[i], 5)

    threads = [threading.Thread(target=waiter, args=(i,)) for i in range(6)]
    threads[0].start()
    deadline = time.monotonic() + 5
    while not e.runner.reaper_busy and time.monotonic() < deadline:
        time.sleep(0.001)
    assert e.runner.reaper_busy
    for th in threads[1:]:
        th.start()
    deadline = time.monotonic() + 5
    while e.runner.sleeping_waiters < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert e.runner.sleeping_waiters == 5
    t0 = time.monotonic()
    e.emu.serve(chains[0])                      # the reaper's own request
    os.eventfd_write(e.runner.call_fd, 1)
    threads[0].join(5)
    assert results.get(0) is True
    time.sleep(0.05)
    for c in reversed(chains[1:]):              # the others, out of order
        e.emu.serve(c)
    os.eventfd_write(e.runner.call_fd, 1)
    for th in threads:
        th.join(10)
    assert results == {i: True for i in range(6)}
    assert time.monotonic() - t0 < 2.5, "completions waited for a timeout instead of a reaper"
    for i, r in enumerate(reqs):
        r.check()
        assert e.view(512 * i, 512) == bytes(e.disk[8 * i * 512:8 * i * 512 + 512])
    assert e.runner.stats.requests == 6 and e.runner.stats.depth == 0
    assert not e.runner.reaper_busy and not e.runner.sleeping_waiters


def test_broken_ring_reported_to_on_broken(env):
    e = env()
    detached = []

    def on_broken(reason, generation):
        e.broken.append((reason, generation))
        if not detached:  # as the device does: tear the session down on another thread
            detached.append(threading.Thread(target=lambda: detached.append(e.runner.detach())))
            detached[0].start()

    e.runner.on_broken = on_broken
    e.runner.start()
    good = BlockRequest(VIRTIO_BLK_T_FLUSH, 0)
    bad = BlockRequest(VIRTIO_BLK_T_FLUSH, 0)
    e.put(good)
    e.put(bad)
    c1, c2 = e.ring.pop_all()

    def device():
        e.emu.serve(c1)
        e.ring.push(c2.head, 5)  # 5 bytes "written" into a 1-byte status
    _answer_later(e, 0.02, device)
    assert e.runner.wait(bad, 0.5) is False
    assert good.finished
    good.check()
    assert e.broken and all(g == GEN and "bytes written" in r for r, g in e.broken)
    detached[0].join(5)
    assert detached[1] == [bad]  # detach() handed back the request the device broke
    assert not bad.finished


def test_detach_finishes_completed_and_returns_the_rest(env):
    """What the device completed before the session ended is finished (not run again); what it
    did not complete is returned for resubmission; reaping afterwards is a no-op."""
    e = env()
    e.runner.start()
    done = BlockRequest(VIRTIO_BLK_T_FLUSH, 0)
    e.put(done)
    e.emu.serve_all()
    pending = BlockRequest(VIRTIO_BLK_T_FLUSH, 0)
    e.put(pending)
    assert e.runner.detach() == [pending]
    assert done.finished and done.status == 0
    assert not pending.finished
    assert e.runner.reap() is None
    assert not pending.finished
    assert e.runner.submit(BlockRequest(VIRTIO_BLK_T_FLUSH, 0), GEN) is None


# --- BlockDevice on the fake back-end: what reaches the caller's buffer -----------------------

@pytest.fixture
def fake_device():
    made = []

    def make(policy=None, raw_hook=None, features=QSD_FEATURES, num_queues=1, **kw):
        disk = bytearray(random.Random(3).randbytes(4 << 20))
        backend = FakeVhostBackend(
            FakeConfig(features, qsd_like_config(len(disk), num_queues), num_queues),
            disk, policy, raw_hook)
        kw.setdefault("request_timeout", 10)
        dev = vblk_core.BlockDevice.open(backend, **kw)
        made.append((dev, backend))
        return dev, backend

    yield make
    for dev, backend in made:
        dev.close()
        backend.stop()
        assert not backend.errors, backend.errors


@pytest.mark.parametrize("event_idx", [True, False])
def test_fake_backend_round_trip(fake_device, event_idx):
    features = QSD_FEATURES if event_idx else QSD_FEATURES & ~VirtioFeature.EVENT_IDX
    dev, backend = fake_device(features=features, num_queues=2, queue_size=8,
                               bounce_buffer_size=8192, bounce_buffers=4)
    assert dev.num_queues == 2
    data = random.Random(9).randbytes(64 << 10)
    dev.pwrite(data, 4096)
    assert backend.disk[4096:4096 + len(data)] == data
    buf = bytearray(len(data) + 1024)
    dev.pread(buf, 3072)
    assert bytes(buf) == bytes(backend.disk[3072:3072 + len(buf)])
    assert dev.get_id() == b"fake-blk"
    assert dev.stats()["totals"]["requests"] >= 2 * (64 << 10) // 8192


def test_short_read_never_reaches_callers_buffer(fake_device):
    # The device fills the whole data buffer but reports only 100 bytes.
    dev, _ = fake_device(policy=lambda r: Behaviour(used_len=101, data_fill=0xEE)
                         if r.type == 0 else None)
    buf = bytearray(b"\x5A" * 8192)
    with pytest.raises(RequestError, match="short read") as info:
        dev.pread(buf, 0)
    assert info.value.errno == errno.EIO
    assert buf == b"\x5A" * 8192


def test_failed_chunk_of_a_large_read_is_not_copied(fake_device):
    # 4 chunks of 8 KiB; the third (sector 32) is short.
    def policy(r):
        if r.type == 0 and r.sector == 32:
            return Behaviour(used_len=1, data_fill=0xEE)
        return None
    dev, backend = fake_device(policy=policy, bounce_buffer_size=8192, bounce_buffers=2)
    buf = bytearray(b"\x5A" * 32768)
    with pytest.raises(RequestError) as info:
        dev.pread(buf, 0)
    assert info.value.errno == errno.EIO
    assert buf[16384:24576] == b"\x5A" * 8192
    # chunks the device did report may have been copied, and then hold the disk's bytes
    for start in (0, 8192, 24576):
        chunk = bytes(buf[start:start + 8192])
        assert chunk in (b"\x5A" * 8192, bytes(backend.disk[start:start + 8192]))


@pytest.mark.parametrize("status,err", [(S_IOERR, errno.EIO), (S_UNSUPP, errno.EOPNOTSUPP),
                                        (9, errno.EPROTO)])
def test_device_status_reaches_caller(fake_device, status, err):
    dev, _ = fake_device(policy=lambda r: Behaviour(status=status, data_fill=0xEE))
    buf = bytearray(4096)
    with pytest.raises(RequestError) as info:
        dev.pread(buf, 0)
    assert info.value.errno == err and buf == bytes(4096)
    for op in (lambda: dev.pwrite(b"x" * 512, 0), dev.flush, lambda: dev.discard(0, 4096),
               lambda: dev.write_zeroes(0, 4096)):
        with pytest.raises(RequestError) as info:
            op()
        assert info.value.errno == err


def test_unwritten_status_on_write_is_an_error(fake_device):
    dev, backend = fake_device(policy=lambda r: Behaviour(write_status=False)
                               if r.type == 1 else None)
    dev.flush()  # other requests fine
    with pytest.raises(RequestError) as info:
        dev.pwrite(b"\x01" * 4096, 0)
    assert info.value.errno == errno.EPROTO


def test_broken_ring_fails_the_device(fake_device):
    def hook(queue, ring, chain):
        if chain.descs[0].len == 16 and len(chain.descs) == 3:
            ring.push(ring.size + 3, 0)  # an id outside the queue
            return True
        return False
    dev, _ = fake_device(raw_hook=hook, queue_size=8)
    dev.flush()
    with pytest.raises(RequestError) as info:
        dev.pread(bytearray(512), 0)
    assert info.value.errno == errno.EIO
    assert dev.state is vblk_core.DeviceState.FAILED
    assert "virtqueue protocol" in dev.failure
    with pytest.raises(RequestError):
        dev.flush()


@pytest.mark.parametrize("spin", [0.0, 5.0])
def test_lone_request_spins_on_the_used_ring(env, spin):
    """At depth 1 the reaper watches the used ring before sleeping: a completion the device
    makes without signalling the call eventfd is then found by spinning (no call needed)."""
    e = env(spin_seconds=spin)
    e.runner.start()
    req = read_req(e)
    e.put(req)

    def device():
        time.sleep(0.01)
        assert e.emu.serve_all() == 1     # no call eventfd write: only a spinner sees it
    t = threading.Thread(target=device, daemon=True)
    t.start()
    assert e.runner.wait(req, 5) is True
    t.join()
    req.check()
    assert e.runner.stats.calls == 0
    assert e.runner.stats.spin_hits == (1 if spin else 0)
