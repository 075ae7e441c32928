"""The split virtqueue (vblk_core/virtqueue.py) against the fake device side in
fake_ring_device.py: the same memory, no sockets, no daemon.  One layer: the ring."""
from __future__ import annotations

import random

import pytest

import vblk_core
from fake_ring_device import F_NEXT, F_WRITE, USED_F_NO_NOTIFY, FakeRing
from vblk_core.errors import RingError
from vblk_core.layout import VirtqueueLayout
from vblk_core.virtio_blk import VirtioBlkReqSlot
from vblk_core.virtqueue import VIRTQ_AVAIL_F_NO_INTERRUPT, Virtqueue

GUEST = 0x7F0000100000  # any 16-aligned guest address for mem[0]


def make_queue(size: int, event_idx: bool = False, data: int = 1 << 16):
    lay = VirtqueueLayout.new(1, size, VirtioBlkReqSlot)
    mem = memoryview(bytearray(lay.end_offset + data))
    vq = Virtqueue(mem, 0, lay, GUEST, 8, event_idx)
    ring = FakeRing.from_layout(mem, 0, lay, GUEST)
    return vq, ring, GUEST + lay.end_offset


def publish(vq: Virtqueue, head: int, segments) -> None:
    vq.publish(head, vq.write_chain(head, segments))


# --- publishing chains -------------------------------------------------------------------------

def test_chain_written_and_published_as_the_device_sees_it():
    vq, ring, data = make_queue(8)
    segs = [(data, 16, False), (data + 512, 4096, True), (data + 8192, 1, True)]
    assert vq.write_chain(3, segs) == 4097
    vq.publish(3, 4097)
    assert ring.avail_idx == 1 and vq.in_flight == 1
    (chain,) = ring.pop_all()
    assert chain.head == 3
    assert [(d.addr, d.len, bool(d.flags & F_WRITE)) for d in chain.descs] == segs
    assert [d.index for d in chain.descs] == [3, 4, 5]     # a slot's chain is contiguous
    assert [bool(d.flags & F_NEXT) for d in chain.descs] == [True, True, False]
    assert all(d.flags & ~(F_NEXT | F_WRITE) == 0 for d in chain.descs)
    assert chain.writable_bytes == 4097
    # one descriptor rewritten (what a request changes): the device sees the new length
    ring.push(3, 4097)
    assert vq.harvest() == [(3, 4097)]
    vq.write_desc(4, data + 512, 512, F_NEXT, 5)
    vq.publish(3, 1)
    (chain,) = ring.pop_all()
    assert [(d.len, d.writable) for d in chain.descs] == [(16, False), (512, False), (1, True)]


def test_write_chain_rejects_empty_and_overflowing_chains():
    vq, ring, data = make_queue(4)
    with pytest.raises(ValueError):
        vq.write_chain(0, [])
    with pytest.raises(ValueError):
        vq.write_chain(2, [(data, 1, False)] * 3)
    assert vq.write_chain(1, [(data, 1, False)] * 3) == 0
    assert ring.avail_idx == 0  # writing is not publishing


@pytest.mark.parametrize("size", [4, 8, 16])
def test_random_publish_and_out_of_order_completion(size):
    """Random requests on fixed 2-descriptor slots completed in random order: the device sees
    exactly what was published, in order, and every completion is reported once."""
    rnd = random.Random(size)
    vq, ring, data = make_queue(size)
    heads = list(range(0, size, 2))
    free, in_flight = list(heads), {}
    for _step in range(3000):
        if in_flight and (not free or rnd.random() < 0.45):
            head = rnd.choice(list(in_flight))
            writable = in_flight.pop(head)
            ring.push(head, writable)
            assert vq.harvest() == [(head, writable)]
            free.append(head)
        else:
            head = free.pop(rnd.randrange(len(free)))
            segs = [(data + 64 * rnd.randrange(256), rnd.randint(1, 4096), rnd.random() < 0.5)
                    for _ in range(2)]
            publish(vq, head, segs)
            (chain,) = ring.pop_all()
            assert chain.head == head
            assert [(d.addr, d.len, d.writable) for d in chain.descs] == segs
            in_flight[head] = chain.writable_bytes
        assert vq.in_flight == len(in_flight)
        assert sorted(vq.in_flight_heads()) == sorted(in_flight)


def test_wraparound_of_16_bit_indices():
    """More than 65536 requests through a 4-entry queue."""
    vq, ring, data = make_queue(4)
    total, done = 70_003, 0
    while done < total:
        batch = [h for h in (0, 2) if done + h // 2 < total]
        for h in batch:
            publish(vq, h, [(data + h, 1, True), (data + 8, 1, True)])
        chains = ring.pop_all()
        assert [c.head for c in chains] == batch
        for c in reversed(chains):  # complete in reverse order
            ring.push(c.head, 2, publish=False)
        ring.publish()
        got = vq.harvest()
        assert got == [(c.head, 2) for c in reversed(chains)]
        done += len(got)
    assert vq.avail_idx == total & 0xFFFF == ring.last_avail
    assert vq.last_used_idx == total & 0xFFFF == ring.used_idx
    assert vq.in_flight == 0 and not vq.has_used()


# --- notifications -----------------------------------------------------------------------------

def _need_event_reference(event: int, new: int, old: int) -> bool:
    """The device wants a kick iff avail_event is one of the indices published since old."""
    return event in {(old + i) & 0xFFFF for i in range((new - old) & 0xFFFF)}


def test_needs_kick_event_idx_against_reference():
    rnd = random.Random(7)
    vq, ring, data = make_queue(8, event_idx=True)
    assert not vq.needs_kick(0, 0)  # nothing published
    published = kicks = 0
    while published < 70_000:
        old = vq.avail_idx
        ring.set_avail_event(old + rnd.randint(-2, 10))
        n = rnd.randint(1, 8)
        for h in range(n):
            publish(vq, h, [(data, 1, True)])
        published += n
        want = _need_event_reference(ring.avail_event, vq.avail_idx, old)
        got = vq.needs_kick(old, vq.avail_idx)
        assert got == want, (old, vq.avail_idx)
        kicks += got
        ring.pop_all()
        for h in range(n):
            ring.push(h, 1)
        vq.harvest()
    assert 0 < kicks < published // 2


def test_needs_kick_windows_of_two_publishers_cover_every_entry():
    """Two publishers decide on their own windows [0, 1) and [1, 2): whichever window holds
    avail_event kicks (a kick is never lost, whoever published last)."""
    vq, ring, data = make_queue(8, event_idx=True)
    for event, want in ((0, (True, False)), (1, (False, True)), (5, (False, False))):
        vq, ring, data = make_queue(8, event_idx=True)
        ring.set_avail_event(event)
        publish(vq, 0, [(data, 1, True)])
        publish(vq, 2, [(data, 1, True)])
        assert (vq.needs_kick(0, 1), vq.needs_kick(1, 2)) == want


def test_needs_kick_without_event_idx_follows_no_notify():
    vq, ring, data = make_queue(8)
    publish(vq, 0, [(data, 1, True)])
    assert vq.needs_kick(0, 1)
    ring.set_used_flags(USED_F_NO_NOTIFY)
    publish(vq, 2, [(data, 1, True)])
    assert not vq.needs_kick(1, 2)
    ring.set_used_flags(0)
    publish(vq, 4, [(data, 1, True)])
    assert vq.needs_kick(2, 3)


def test_notifications_enabled_and_disabled():
    vq, ring, data = make_queue(8, event_idx=True)
    for h in (0, 2, 4):
        publish(vq, h, [(data, 1, True)])
        ring.push(h, 1)
    vq.harvest()
    vq.enable_notifications()
    assert ring.used_event == 3            # signal at the next completion
    vq.disable_notifications()
    assert ring.used_event == 2            # just behind: only a wrap would pass it
    vq2, ring2, _ = make_queue(8)
    vq2.disable_notifications()
    assert ring2.avail_flags == VIRTQ_AVAIL_F_NO_INTERRUPT
    vq2.enable_notifications()
    assert ring2.avail_flags == 0


def test_has_used_and_watch_used():
    vq, ring, data = make_queue(4)
    publish(vq, 0, [(data, 1, True)])
    assert not vq.has_used()
    assert not vq.watch_used(200_000)      # 0.2 ms of looking, nothing came
    ring.push(0, 1)
    assert vq.has_used() and vq.watch_used(0) is False and vq.watch_used(1000)
    vq.harvest()
    assert not vq.has_used()
    assert vq.harvest() == []


# --- a hostile device --------------------------------------------------------------------------

def _three_requests(vq):
    """Three chains at heads 0, 3, 6: A (513 writable), B (none), C (1 writable)."""
    base = GUEST + vq.layout.end_offset
    publish(vq, 0, [(base, 16, False), (base + 512, 512, True), (base + 16, 1, True)])
    publish(vq, 3, [(base + 32, 16, False)])
    publish(vq, 6, [(base + 48, 16, False), (base + 64, 1, True)])
    return 0, 3, 6


def _assert_device_error(vq, completed, match):
    with pytest.raises(RingError, match=match) as info:
        vq.harvest()
    assert info.value.completed == completed
    return info.value


def _assert_reusable(vq, ring):
    """After a RingError, reset() gives a clean queue that works again."""
    vq.reset()
    ring.last_avail = ring.used_idx = 0
    assert vq.in_flight == 0 and not vq.has_used()
    base = GUEST + vq.layout.end_offset
    for h in range(vq.size):
        publish(vq, h, [(base, 1, True)])
    assert [c.head for c in ring.pop_all()] == list(range(vq.size))
    for h in range(vq.size):
        ring.push(h, 1)
    assert len(vq.harvest()) == vq.size


@pytest.mark.parametrize("bad_id", [8, 9, 1000, 0xFFFFFFFF])
def test_used_id_out_of_range(bad_id):
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 513, publish=False)
    ring.push(bad_id, 0)
    _assert_device_error(vq, [(a, 513)], "not an in-flight request head")
    assert vq.in_flight == 2 and vq.last_used_idx == 1   # A done, B and C still in flight
    _assert_reusable(vq, ring)


def test_used_id_not_in_flight():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(b, 0, publish=False)
    ring.push(a + 1, 0)                    # inside A's chain, not its head
    _assert_device_error(vq, [(b, 0)], "not an in-flight")
    vq2, ring2, _ = make_queue(8)
    _three_requests(vq2)
    ring2.push(7, 0)                       # never published
    _assert_device_error(vq2, [], "not an in-flight")
    assert vq2.in_flight == 3


def test_same_id_completed_twice():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(c, 1, publish=False)
    ring.push(c, 1)
    _assert_device_error(vq, [(c, 1)], "not an in-flight")
    vq, ring, _ = make_queue(8)            # and across two harvests
    a, b, c = _three_requests(vq)
    ring.push(a, 1)
    assert vq.harvest() == [(a, 1)]
    ring.push(a, 1)
    _assert_device_error(vq, [], "not an in-flight")


@pytest.mark.parametrize("which,length", [("a", 514), ("b", 1), ("c", 2), ("a", 0x80000000)])
def test_length_beyond_writable_bytes(which, length):
    vq, ring, _ = make_queue(8)
    heads = dict(zip("abc", _three_requests(vq), strict=True))
    first = heads["c"] if which != "c" else heads["b"]
    ring.push(first, 0, publish=False)
    ring.push(heads[which], length)
    _assert_device_error(vq, [(first, 0)], "bytes written")
    vq, ring, _ = make_queue(8)            # the exact limit is fine
    heads = dict(zip("abc", _three_requests(vq), strict=True))
    ring.push(heads[which], {"a": 513, "b": 0, "c": 1}[which])
    assert len(vq.harvest()) == 1


def test_used_idx_jumps_beyond_in_flight():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 0, publish=False)
    ring.set_used_idx(4)                   # 4 entries with 3 requests in flight
    err = _assert_device_error(vq, [], "moved the used index by 4 with 3 requests")
    assert vq.in_flight == 3 and vq.last_used_idx == 0   # nothing of it is believed
    assert isinstance(err, vblk_core.VblkError)
    _assert_reusable(vq, ring)


def test_used_idx_backwards_is_an_error():
    vq, ring, _ = make_queue(8)
    a, b, c = _three_requests(vq)
    ring.push(a, 0)
    vq.harvest()
    ring.set_used_idx(0)  # moves "forward" by 65535
    _assert_device_error(vq, [], "moved the used index")


def test_forget_and_reset_keep_the_descriptor_table():
    vq, ring, data = make_queue(8)
    a, b, c = _three_requests(vq)
    vq.forget(b)
    vq.forget(b)                           # twice is once
    assert vq.in_flight == 2 and sorted(vq.in_flight_heads()) == [a, c]
    vq.reset()
    assert vq.in_flight == 0 and vq.avail_idx == 0 and ring.avail_idx == 0
    assert ring.desc(a).len == 16 and ring.desc(a + 1).len == 512   # chains stay written
