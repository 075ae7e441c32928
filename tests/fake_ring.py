"""The device side of one split virtqueue (virtio 1.x, 2.7), for the fake devices and the ring
tests: no sockets, no daemon.

``FakeRing`` reads the descriptor table and the available ring straight from the memory the
driver writes, and writes the used ring, as a real device does; it can also misbehave on demand
(raw used entries, an arbitrary used idx, avail_event, NO_NOTIFY).  It is written from the spec,
independently of vblk_core.virtqueue: the only things it shares with the driver are the memory
and the layout offsets.  What the requests mean is fake_blk's (the virtio-blk device).
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
USED_F_NO_NOTIFY = 1
AVAIL_F_NO_INTERRUPT = 1

#: ``translate(guest_address, length) -> (memory, offset)``: where a buffer of the driver is
Translate = Callable[[int, int], tuple[memoryview, int]]


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event(): whether moving an index from ``old`` to ``new`` passed
    ``event`` (the other side's used_event or avail_event)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass(frozen=True)
class Desc:
    index: int
    addr: int
    len: int
    flags: int
    next: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & F_WRITE)


@dataclass
class Chain:
    head: int
    descs: list[Desc]

    @property
    def writable_bytes(self) -> int:
        return sum(d.len for d in self.descs if d.writable)

    def check_request(self) -> None:
        """A request's chain: direct descriptors only (INDIRECT_DESC is not negotiated here),
        the device-readable ones first.  Raises RingFault."""
        for before, d in zip([None, *self.descs], self.descs, strict=False):
            if d.flags & F_INDIRECT:
                raise RingFault(f"descriptor {d.index}: indirect (not negotiated)")
            if before is not None and before.writable and not d.writable:
                raise RingFault(f"descriptor {d.index}: device-readable after a writable one")

    def readable(self) -> list[Desc]:
        return [d for d in self.descs if not d.writable]

    def writable(self) -> list[Desc]:
        return [d for d in self.descs if d.writable]


class RingFault(Exception):
    """The driver published something a device must reject (a loop, an index out of range, a
    buffer outside its memory; for a request, an indirect descriptor or a readable buffer
    after a writable one)."""


class FakeRing:
    """The device side of one split virtqueue.

    ``mem`` holds the ring at byte offsets ``desc_off``/``avail_off``/``used_off``; the driver's
    buffers are found by ``translate`` if given, else in ``mem`` too, guest address
    ``guest_base`` being mem[0].
    """

    def __init__(self, mem: Any, size: int, desc_off: int, avail_off: int, used_off: int,
                 guest_base: int, translate: Translate | None = None) -> None:
        self.mem = memoryview(mem).cast("B") if not isinstance(mem, memoryview) else mem
        self.size = size
        self.desc_off = desc_off
        self.avail_off = avail_off
        self.used_off = used_off
        self.guest_base = guest_base
        self.translate = translate
        # Ring indexes and event words are accessed as whole 16-bit words, as a real device
        # does (a bytewise store could be seen torn by the driver running on another thread).
        for off in (avail_off, used_off):
            if off % 2:
                raise RingFault(f"ring offset {off} is not 2-byte aligned")
        self._w = self.mem[:len(self.mem) // 2 * 2].cast("H")
        self.last_avail = 0   # next avail entry to consume (free-running u16)
        self.used_idx = 0     # our used idx (free-running u16)

    @classmethod
    def from_layout(cls, mem: Any, offset: int, layout: Any, guest_base: int) -> FakeRing:
        return cls(mem, layout.queue_size, offset, offset + layout.avail_offset,
                   offset + layout.used_offset, guest_base)

    # --- guest memory ----------------------------------------------------------------------

    def span(self, addr: int, length: int) -> tuple[memoryview, int]:
        """(memory, offset) of the driver's buffer at ``addr``.  Raises RingFault if it is
        outside the memory the device can reach."""
        if self.translate is not None:
            try:
                return self.translate(addr, length)
            except (OSError, ValueError) as e:
                raise RingFault(f"guest address {addr:#x}+{length}: {e}") from None
        off = addr - self.guest_base
        if off < 0 or off + length > len(self.mem):
            raise RingFault(f"guest address {addr:#x}+{length} outside memory")
        return self.mem, off

    def read(self, addr: int, length: int) -> bytes:
        mem, off = self.span(addr, length)
        return bytes(mem[off:off + length])

    def write(self, addr: int, data: bytes) -> None:
        mem, off = self.span(addr, len(data))
        mem[off:off + len(data)] = data

    def release(self) -> None:
        """Drop the views on the memory (so its owner can unmap it)."""
        self._w.release()

    # --- driver-written structures ---------------------------------------------------------

    def desc(self, i: int) -> Desc:
        addr, length, flags, nxt = DESC.unpack_from(self.mem, self.desc_off + 16 * i)
        return Desc(i, addr, length, flags, nxt)

    @property
    def avail_flags(self) -> int:
        return self._w[self.avail_off // 2]

    @property
    def avail_idx(self) -> int:
        return self._w[self.avail_off // 2 + 1]

    @property
    def used_event(self) -> int:
        return self._w[self.avail_off // 2 + 2 + self.size]

    @property
    def avail_event(self) -> int:
        return self._w[self.used_off // 2 + 2 + 4 * self.size]

    def pending(self) -> int:
        """Entries the driver made available that the device has not taken (more than the
        ring size: the driver moved avail idx too far)."""
        return (self.avail_idx - self.last_avail) & 0xFFFF

    def take(self) -> int:
        """Consume the next avail entry: the head it names (not checked)."""
        head = self._w[self.avail_off // 2 + 2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def walk(self, head: int) -> Chain:
        """The chain starting at descriptor ``head``, whatever its flags say.  Raises RingFault
        for a head out of range or a chain that loops or leaves the table."""
        if head >= self.size:
            raise RingFault(f"avail ring names descriptor {head} (queue size {self.size})")
        descs, i = [], head
        while True:
            d = self.desc(i)
            descs.append(d)
            if not d.flags & F_NEXT:
                return Chain(head, descs)
            if len(descs) >= self.size or d.next >= self.size:
                raise RingFault(f"descriptor chain from {head} loops or leaves the table")
            i = d.next

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        if self.pending() == 0:
            return None
        return self.walk(self.take())

    def pop_all(self) -> list[Chain]:
        chains = []
        while (c := self.pop()) is not None:
            chains.append(c)
        return chains

    # --- device-written structures ---------------------------------------------------------

    def put_used_elem(self, pos: int, head: int, length: int) -> None:
        """Raw: write used ring entry ``pos`` (taken modulo the size), idx untouched."""
        USED_ELEM.pack_into(self.mem, self.used_off + 4 + 8 * (pos % self.size), head, length)

    def set_used_idx(self, value: int) -> None:
        """Raw: publish ``value`` as the used idx (and adopt it as ours)."""
        self.used_idx = value & 0xFFFF
        self._w[self.used_off // 2 + 1] = self.used_idx

    def push(self, head: int, length: int, publish: bool = True) -> None:
        """Append a used entry; with ``publish`` make it visible (write used idx).  (x86 keeps
        stores in order: the entry is visible before the index that exposes it.)"""
        self.put_used_elem(self.used_idx, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self._w[self.used_off // 2 + 1] = self.used_idx

    def set_used_flags(self, flags: int) -> None:
        self._w[self.used_off // 2] = flags

    def set_avail_event(self, value: int) -> None:
        self._w[self.used_off // 2 + 2 + 4 * self.size] = value & 0xFFFF
