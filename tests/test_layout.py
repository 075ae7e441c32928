"""VirtqueueLayout arithmetic and the Virtqueue / BlockDevice checks built on it."""
from __future__ import annotations

import ctypes

import pytest

import vblk_core
from device_util import open_device
from vblk_core.layout import DESC_SIZE, VirtqueueLayout, align_up
from vblk_core.virtio_blk import VirtioBlkReqSlot
from vblk_core.virtqueue import Virtqueue


class OneByte(ctypes.Structure):
    _fields_ = [("b", ctypes.c_uint8)]


class OddAligned8(ctypes.Structure):
    """8-byte alignment, 17 bytes of fields (sizeof pads to 24)."""
    _fields_ = [("q", ctypes.c_uint64), ("r", ctypes.c_uint64), ("b", ctypes.c_uint8)]


class OddPacked(ctypes.Structure):
    """Odd size (13) with alignment 1."""
    _pack_ = 1
    _fields_ = [("q", ctypes.c_uint64), ("i", ctypes.c_uint32), ("b", ctypes.c_uint8)]


class Aligned16(ctypes.Structure):
    """16-byte alignment (a long double on x86-64; an explicit alignment member elsewhere)."""
    _fields_ = [("x", ctypes.c_longdouble), ("b", ctypes.c_uint8)]


REQ_TYPES = [VirtioBlkReqSlot, OneByte, OddAligned8, OddPacked, Aligned16]
QUEUE_SIZES = [1, 2, 16, 256, 32768]


def test_request_types_are_what_the_tests_claim():
    assert ctypes.sizeof(OneByte) == 1 and ctypes.alignment(OneByte) == 1
    assert ctypes.alignment(OddAligned8) == 8 and ctypes.sizeof(OddAligned8) == 24
    assert ctypes.sizeof(OddPacked) == 13 and ctypes.alignment(OddPacked) == 1
    assert ctypes.alignment(VirtioBlkReqSlot) == 8
    if ctypes.alignment(Aligned16) != 16:
        pytest.skip("long double is not 16-byte aligned on this platform")


@pytest.mark.parametrize("req_type", REQ_TYPES, ids=lambda t: t.__name__)
@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_layout_invariants(n, req_type):
    lay = VirtqueueLayout.new(3, n, req_type)
    req_align = ctypes.alignment(req_type)
    assert lay.queue_size == n and lay.num_queues == 3
    assert lay.req_size == ctypes.sizeof(req_type)
    # descriptor table at 0, avail ring right after it
    assert lay.avail_offset == DESC_SIZE * n
    # avail ring: flags, idx, ring[n], used_event -> 2 * (3 + n) bytes; used starts after it
    avail_end = lay.avail_offset + 2 * (3 + n)
    assert lay.used_offset >= avail_end
    assert lay.used_offset % 8 == 4                 # flags+idx, then 8-aligned elements
    assert lay.used_offset - avail_end < 8          # no more padding than alignment needs
    # used ring: flags, idx, ring[n] of 8 bytes, avail_event -> 6 + 8n bytes
    used_end = lay.used_offset + 6 + 8 * n
    assert lay.req_offset >= used_end
    assert lay.req_offset % req_align == 0
    assert lay.req_offset - used_end < req_align
    assert 0 < lay.avail_offset < lay.used_offset < lay.req_offset < lay.end_offset
    assert lay.end_offset % 16 == 0
    assert lay.end_offset >= lay.req_offset + n * ctypes.sizeof(req_type)
    assert lay.end_offset - (lay.req_offset + n * ctypes.sizeof(req_type)) < 16
    assert lay.total_size == 3 * lay.end_offset
    # every queue of a multi-queue allocation starts 16-aligned and the queues do not overlap
    for i in range(3):
        assert (i * lay.end_offset) % 16 == 0


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_used_elements_never_straddle_a_page(n):
    """Every 8-byte used element of every queue is 8-aligned, so none crosses a 4 KiB page
    (QEMU's virtio-pci device behind an IOMMU writes such an element to the wrong address)."""
    lay = VirtqueueLayout.new(8, n, VirtioBlkReqSlot)
    for q in range(8):
        first = q * lay.end_offset + lay.used_offset + 4
        for i in range(n):
            start = first + 8 * i
            assert start % 8 == 0
            assert start // 4096 == (start + 7) // 4096


@pytest.mark.parametrize("n", QUEUE_SIZES)
def test_req_slots_are_aligned_in_every_queue(n):
    lay = VirtqueueLayout.new(4, n, OddAligned8)
    for q in range(4):
        base = q * lay.end_offset
        for slot in (0, n - 1):
            assert (base + lay.req_offset + slot * lay.req_size) % 8 == 0
            assert base + lay.req_offset + (slot + 1) * lay.req_size <= (q + 1) * lay.end_offset


def test_layout_known_values():
    # queue size 256 with the real slot: 4096 + 518 = 4614 -> used at 4620 (4 mod 8),
    # 4620 + 6 + 2048 = 6674 -> slots at 6680
    lay = VirtqueueLayout.new(1, 256, VirtioBlkReqSlot)
    assert (lay.avail_offset, lay.used_offset, lay.req_offset) == (4096, 4620, 6680)
    assert lay.end_offset == align_up(6680 + 256 * ctypes.sizeof(VirtioBlkReqSlot), 16)
    # queue size 2, one-byte slots: desc 32, avail 10 -> 42 -> used 44, used 22 -> 66, end 80
    lay = VirtqueueLayout.new(1, 2, OneByte)
    assert (lay.avail_offset, lay.used_offset, lay.req_offset, lay.end_offset) == (32, 44, 66, 80)


@pytest.mark.parametrize("bad", [0, 3, 100, 65536, -1, 32769, 65535, 2.0, None])
def test_invalid_queue_size(bad):
    with pytest.raises(ValueError, match="Invalid queue size"):
        VirtqueueLayout.new(1, bad, VirtioBlkReqSlot)


@pytest.mark.parametrize("bad", [0, -1])
def test_invalid_queue_count(bad):
    with pytest.raises(ValueError):
        VirtqueueLayout.new(bad, 16, VirtioBlkReqSlot)


def test_align_up():
    assert [align_up(v, 16) for v in (0, 1, 15, 16, 17)] == [0, 16, 16, 16, 32]
    assert align_up(5, 1) == 5


# --- Virtqueue checks on its memory slice ------------------------------------------------------

def _aligned_buffer(size: int):
    """A writable memoryview and the address of its element 0, with 64 spare bytes so tests can
    pick any alignment by offsetting."""
    buf = (ctypes.c_char * (size + 64))()
    addr = ctypes.addressof(buf)
    return memoryview(buf).cast("B"), addr, buf


def test_virtqueue_accepts_exact_slice():
    lay = VirtqueueLayout.new(2, 16, VirtioBlkReqSlot)
    mem, addr, _keep = _aligned_buffer(lay.total_size)
    skip = (-addr) % 16
    mem = mem[skip:skip + lay.total_size]
    for q in range(2):
        vq = Virtqueue(mem, q * lay.end_offset, lay, addr + skip)
        assert vq.desc_addr == addr + skip + q * lay.end_offset
        assert vq.used_addr - vq.desc_addr == lay.used_offset
        assert vq.avail_addr - vq.desc_addr == lay.avail_offset


@pytest.mark.parametrize("short_by", [1, 16])
def test_virtqueue_too_short_slice(short_by):
    lay = VirtqueueLayout.new(1, 16, VirtioBlkReqSlot)
    mem = memoryview(bytearray(lay.end_offset - short_by))
    with pytest.raises(ValueError, match="Incorrectly sized queue buffer"):
        Virtqueue(mem, 0, lay, 0x10000)
    # the second queue of a two-queue area one byte too short
    lay2 = VirtqueueLayout.new(2, 16, VirtioBlkReqSlot)
    mem = memoryview(bytearray(lay2.total_size - short_by))
    Virtqueue(mem, 0, lay2, 0x10000)
    with pytest.raises(ValueError, match="Incorrectly sized queue buffer"):
        Virtqueue(mem, lay2.end_offset, lay2, 0x10000)


def test_virtqueue_negative_offset():
    lay = VirtqueueLayout.new(1, 16, VirtioBlkReqSlot)
    with pytest.raises(ValueError, match="Incorrectly sized queue buffer"):
        Virtqueue(memoryview(bytearray(2 * lay.end_offset)), -16, lay, 0x10000)


def test_virtqueue_misaligned_base():
    lay = VirtqueueLayout.new(1, 16, VirtioBlkReqSlot)
    mem = memoryview(bytearray(lay.end_offset + 64))
    with pytest.raises(ValueError, match="Insufficient memory alignment"):
        Virtqueue(mem, 8, lay, 0x10000)
    with pytest.raises(ValueError, match="Insufficient memory alignment"):
        Virtqueue(mem, 0, lay, 0x10004)


def test_virtqueue_misaligned_req_area():
    # One-byte slots put req_offset at 38 for queue size 1: fine for 1-byte alignment,
    # misaligned when the caller needs 8-byte aligned slots.
    lay = VirtqueueLayout.new(1, 1, OneByte)
    assert lay.req_offset % 8 != 0
    mem = memoryview(bytearray(lay.end_offset))
    Virtqueue(mem, 0, lay, 0x10000, req_alignment=1)
    with pytest.raises(ValueError, match="Insufficient memory alignment"):
        Virtqueue(mem, 0, lay, 0x10000, req_alignment=8)


# --- BlockDevice: queue count and size against a real daemon ----------------------------------

def test_too_many_queues_requested(qsd_factory):
    qsd = qsd_factory(num_queues=2)
    with pytest.raises(vblk_core.ConfigError, match="Too many queues requested") as info:
        open_device(qsd.socket, num_queues=3)
    assert "2" in str(info.value)
    # the failed attempt left the daemon usable
    with open_device(qsd.socket, num_queues=2) as dev:
        assert dev.num_queues == 2
