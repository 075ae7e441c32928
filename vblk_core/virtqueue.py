"""Split virtqueue (virtio 1.x, section 2.7) over one slice of shared memory: driver side.

The descriptor table is not a free list here: it is cut into fixed chains, one per request
slot (the slot whose chain starts at descriptor ``head`` owns descriptors ``head`` to
``head + chain_len - 1``).  The queue runner writes a slot's descriptors once and changes only
what a request changes, so publishing a request is a few stores and never walks a free list.

Not thread-safe: the caller serializes publishing (a lock per queue) and harvesting (one
reaper).  Everything the device writes (the used ring, the avail_event word) is validated
before use: a bad value raises RingError and never corrupts memory.  Notification words (the
avail ring's flags and used_event) are written by the one thread that looks at the used ring.
"""
from __future__ import annotations

import struct
import time

from .errors import RingError
from .layout import VirtqueueLayout

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC = struct.Struct("<QIHH")
NOT_IN_FLIGHT = -1


class Virtqueue:
    """One split virtqueue: descriptor table, available ring, used ring, per-request slots.

    ``mem`` is a writable memoryview of the whole shared region; the queue occupies
    ``layout.end_offset`` bytes from ``offset``; ``guest_base`` is the device address of mem[0].
    Raises ValueError("Incorrectly sized queue buffer") if the slice is too short and
    ValueError("Insufficient memory alignment") if the rings or slots are misaligned.
    """

    def __init__(self, mem: memoryview, offset: int, layout: VirtqueueLayout, guest_base: int,
                 req_alignment: int = 8, event_idx: bool = False) -> None:
        if offset < 0 or len(mem) - offset < layout.end_offset:
            raise ValueError("Incorrectly sized queue buffer")
        self.mem = mem
        self.size = layout.queue_size
        self.layout = layout
        self.offset = offset
        self.req_alignment = req_alignment
        self.set_device_base(guest_base)
        self.req_off = offset + layout.req_offset
        self.req_size = layout.req_size
        avail_off = offset + layout.avail_offset
        used_off = offset + layout.used_offset
        # Indexes shared with the device are read and written as whole 16-bit words (and used
        # elements as 32-bit words): struct packs byte by byte, and a torn index
        # (0x00FF -> 0x0000 -> 0x0100) makes the other side see a ring that moved by ~65535.
        self._words = mem[:len(mem) // 4 * 4].cast("H")
        self._dwords = mem[:len(mem) // 4 * 4].cast("I")
        self._avail_flags_w = avail_off // 2
        self._avail_idx_w = avail_off // 2 + 1
        self._avail_ring_w = avail_off // 2 + 2
        self._used_event_w = avail_off // 2 + 2 + self.size
        self._used_flags_w = used_off // 2
        self._used_idx_w = used_off // 2 + 1
        self._used_ring_dw = (used_off + 4) // 4   # 4 mod 8 + 4: 8-aligned elements
        self._avail_event_w = (used_off + 4 + 8 * self.size) // 2
        self.event_idx = event_idx
        self.reset()

    def set_device_base(self, guest_base: int) -> None:
        """Set the device address of mem[0] (ring addresses follow).  Raises
        ValueError("Insufficient memory alignment") if the rings or slots would be misaligned."""
        offset, layout = self.offset, self.layout
        start = guest_base + offset
        if start % 16 or (start + layout.req_offset) % self.req_alignment:
            raise ValueError("Insufficient memory alignment")
        self.guest_base = guest_base
        self.desc_addr = start
        self.avail_addr = start + layout.avail_offset
        self.used_addr = start + layout.used_offset
        self.req_addr = start + layout.req_offset

    def release(self) -> None:
        """Drop our views of the shared memory, so the region can be unmapped."""
        self._words.release()
        self._dwords.release()

    def reset(self) -> None:
        """Zero the rings (a fresh queue at index 0) and forget what was in flight.  The
        descriptor table is kept: the slots' chains stay written."""
        start = self.offset + self.layout.avail_offset
        end = self.offset + self.layout.req_offset
        self.mem[start:end] = bytes(end - start)
        self._writable = [NOT_IN_FLIGHT] * self.size  # per head: device-writable bytes
        self.in_flight = 0
        self.avail_idx = 0          # next free avail slot (free-running u16)
        self.last_used_idx = 0      # next used entry we have not consumed

    def slot_offset(self, head: int) -> int:
        """Offset in ``mem`` of the per-request slot that belongs to descriptor ``head``."""
        return self.req_off + head * self.req_size

    def slot_addr(self, head: int) -> int:
        """Device address of the per-request slot that belongs to descriptor ``head``."""
        return self.req_addr + head * self.req_size

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_index: int) -> None:
        """Write descriptor ``index`` (device address, length, VIRTQ_DESC_F_* flags, next)."""
        DESC.pack_into(self.mem, self.offset + 16 * index, addr, length, flags, next_index)

    def write_chain(self, head: int, segments: list[tuple[int, int, bool]]) -> int:
        """Write (device address, length, device_writable) segments as the chain at ``head``
        (descriptors head, head+1, ...).  Returns its device-writable bytes.  Raises
        ValueError if the chain is empty or runs past the table."""
        n = len(segments)
        if n == 0 or head < 0 or head + n > self.size:
            raise ValueError("descriptor chain does not fit in the queue")
        writable = 0
        for i, (addr, length, device_writes) in enumerate(segments):
            flags = VIRTQ_DESC_F_WRITE if device_writes else 0
            if device_writes:
                writable += length
            if i + 1 < n:
                flags |= VIRTQ_DESC_F_NEXT
            self.write_desc(head + i, addr, length, flags, head + i + 1 if i + 1 < n else 0)
        return writable

    def publish(self, head: int, writable: int) -> None:
        """Make the chain at ``head`` available; the device may write ``writable`` bytes into
        it.  The caller owns ``head`` (it is not in flight)."""
        self._writable[head] = writable
        self.in_flight += 1
        words, avail_idx = self._words, self.avail_idx
        words[self._avail_ring_w + (avail_idx & (self.size - 1))] = head
        avail_idx = (avail_idx + 1) & 0xFFFF
        self.avail_idx = avail_idx
        words[self._avail_idx_w] = avail_idx  # last: x86 keeps stores in order

    def needs_kick(self, old: int, new: int) -> bool:
        """Whether the device asked to be told of the entries published from avail index
        ``old`` up to ``new``.  Call after a full memory barrier (releasing a lock is one)
        that follows the publishing.  Windows of several publishers may overlap: a kick too
        many is harmless, and every published entry lies in some window."""
        if old == new:
            return False
        if self.event_idx:
            avail_event = self._words[self._avail_event_w]
            # vring_need_event(): did the index pass avail_event between old and new?
            return ((new - avail_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not (self._words[self._used_flags_w] & VIRTQ_USED_F_NO_NOTIFY)

    def has_used(self) -> bool:
        """Whether the device has completed entries we have not harvested."""
        return self._words[self._used_idx_w] != self.last_used_idx

    def watch_used(self, nanoseconds: int) -> bool:
        """Busy-wait up to ``nanoseconds`` for a completion (holding the GIL); True if one
        arrived.  For a request alone on the device, this saves a sleep and a wake-up."""
        words, w, last = self._words, self._used_idx_w, self.last_used_idx
        now = time.perf_counter_ns
        end = now() + nanoseconds
        while now() < end:
            if words[w] != last:
                return True
        return False

    def enable_notifications(self) -> None:
        """Ask for a call at the next completion.  The caller must then issue a full barrier
        and look at ``has_used`` once more before it sleeps (a completion in between would
        not be signalled)."""
        if self.event_idx:
            self._words[self._used_event_w] = self.last_used_idx
        else:
            self._words[self._avail_flags_w] = 0

    def disable_notifications(self) -> None:
        """Ask for no calls: someone is looking at the used ring.  With EVENT_IDX, used_event
        is put just behind the ring, so that only a wrap of 65535 entries would signal."""
        if self.event_idx:
            self._words[self._used_event_w] = (self.last_used_idx - 1) & 0xFFFF
        else:
            self._words[self._avail_flags_w] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def harvest(self) -> list[tuple[int, int]]:
        """Consume new used entries: a list of (head, written length).

        Raises RingError if the device's used index or an entry is invalid (index moved by
        more than what is in flight, id not the head of an in-flight chain, length beyond what
        the chain lets the device write).  Valid entries before a bad one are still consumed
        and travel in the exception's ``completed``.
        """
        used_idx = self._words[self._used_idx_w]
        last = self.last_used_idx
        pending = (used_idx - last) & 0xFFFF
        if pending == 0:
            return []
        completed: list[tuple[int, int]] = []
        if pending > self.in_flight:  # an impossible index: nothing in it is believed
            raise RingError(f"device moved the used index by {pending} with "
                            f"{self.in_flight} requests in flight", completed)
        dwords, ring, mask, size = self._dwords, self._used_ring_dw, self.size - 1, self.size
        writable = self._writable
        for _ in range(pending):
            pos = ring + 2 * (last & mask)
            head, length = dwords[pos], dwords[pos + 1]
            allowed = writable[head] if head < size else NOT_IN_FLIGHT
            if allowed == NOT_IN_FLIGHT:
                raise RingError(f"device completed descriptor {head}, which is not an "
                                f"in-flight request head (queue size {size})", completed)
            if length > allowed:
                raise RingError(f"device reported {length} bytes written to a chain that "
                                f"allows {allowed}", completed)
            writable[head] = NOT_IN_FLIGHT
            self.in_flight -= 1
            last = (last + 1) & 0xFFFF
            self.last_used_idx = last
            completed.append((head, length))
        return completed

    def forget(self, head: int) -> None:
        """Count the chain at ``head`` as no longer in flight (its session ended)."""
        if self._writable[head] != NOT_IN_FLIGHT:
            self._writable[head] = NOT_IN_FLIGHT
            self.in_flight -= 1

    def in_flight_heads(self) -> list[int]:
        """Heads of the chains published and not completed."""
        return [h for h, w in enumerate(self._writable) if w != NOT_IN_FLIGHT]
