"""Split virtqueue (virtio 1.x, section 2.7) over one slice of shared memory.

Driver side only.  Not thread-safe: the caller holds a lock per queue.  Everything the device
writes (the used ring, the avail_event word) is validated before use: a bad value raises
RingError and leaves this object unchanged enough to be reset, never corrupting memory.
"""
from __future__ import annotations

import struct

from .errors import RingError
from .layout import VirtqueueLayout

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class Virtqueue:
    """One split virtqueue: descriptor table, available ring, used ring, per-request slots.

    ``mem`` is a writable memoryview of the whole shared region; the queue occupies
    ``layout.end_offset`` bytes from ``offset``; ``guest_base`` is the device address of mem[0].
    Raises ValueError("Incorrectly sized queue buffer") if the slice is too short and
    ValueError("Insufficient memory alignment") if the per-request slots are misaligned.
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
        self._avail_off = offset + layout.avail_offset
        self._used_off = offset + layout.used_offset
        # Indexes shared with the device are read and written as whole 16-bit words: struct
        # packs byte by byte, and a torn index (0x00FF -> 0x0000 -> 0x0100) makes the device
        # (or us) see a ring that moved by ~65535 entries.  memoryview 'H' items are one access.
        words = mem[:len(mem) // 2 * 2].cast("H")
        self._words = words
        self._avail_idx_w = (self._avail_off + 2) // 2
        self._used_event_w = (self._avail_off + 4 + 2 * self.size) // 2
        self._used_flags_w = self._used_off // 2
        self._used_idx_w = (self._used_off + 2) // 2
        self._avail_event_w = (self._used_off + 4 + 8 * self.size) // 2
        self.event_idx = event_idx
        self.reset()

    def set_device_base(self, guest_base: int) -> None:
        """Set the device address of mem[0] (ring addresses follow).  Raises
        ValueError("Insufficient memory alignment") if the rings or slots would be misaligned."""
        offset, layout = self.offset, self.layout
        start = guest_base + offset
        if start % 16 or (start + layout.req_offset) % self.req_alignment:
            raise ValueError("Insufficient memory alignment")
        self.desc_addr = guest_base + offset
        self.avail_addr = guest_base + offset + layout.avail_offset
        self.used_addr = guest_base + offset + layout.used_offset
        self.req_addr = guest_base + offset + layout.req_offset

    def release(self) -> None:
        """Drop our 16-bit view of the shared memory, so the region can be unmapped."""
        self._words.release()

    def reset(self) -> None:
        """Zero the rings and free every descriptor (a fresh queue at index 0)."""
        start, end = self.offset, self.offset + self.layout.req_offset
        self.mem[start:end] = bytes(end - start)
        size = self.size
        # Free list threaded through `next`; the authoritative copy is ours, not the device's.
        self._next = list(range(1, size + 1))
        self._free_head = 0
        self.num_free = size
        self._chain_len = [0] * size       # descriptors in the chain headed here, 0 = not in flight
        self._writable = [0] * size        # device-writable bytes in that chain
        self.avail_idx = 0                 # next free slot (free-running u16)
        self.last_used_idx = 0             # next used entry we have not consumed
        self._kicked_idx = 0               # avail_idx at the last kick decision
        for i in range(size):
            _DESC.pack_into(self.mem, self.offset + 16 * i, 0, 0, 0, (i + 1) % size)

    @property
    def in_flight(self) -> int:
        return self.size - self.num_free

    def next_head(self) -> int:
        """The descriptor the next chain will start at (its request slot is the request's)."""
        return self._free_head

    def slot_offset(self, head: int) -> int:
        """Offset in ``mem`` of the per-request slot that belongs to descriptor ``head``."""
        return self.req_off + head * self.req_size

    def slot_addr(self, head: int) -> int:
        """Device address of the per-request slot that belongs to descriptor ``head``."""
        return self.req_addr + head * self.req_size

    def add_chain(self, segments: list[tuple[int, int, bool]]) -> int:
        """Publish a chain of (guest address, length, device_writable) segments.

        Returns the head descriptor index.  The caller must have checked ``num_free``;
        raises ValueError if the chain is empty or does not fit.
        """
        n = len(segments)
        if n == 0 or n > self.num_free:
            raise ValueError("descriptor chain does not fit in the queue")
        mem, base, nxt = self.mem, self.offset, self._next
        head = idx = self._free_head
        writable = 0
        for i, (addr, length, device_writes) in enumerate(segments):
            flags = VIRTQ_DESC_F_WRITE if device_writes else 0
            if device_writes:
                writable += length
            following = nxt[idx]
            if i + 1 < n:
                flags |= VIRTQ_DESC_F_NEXT
                _DESC.pack_into(mem, base + 16 * idx, addr, length, flags, following)
                idx = following
            else:
                _DESC.pack_into(mem, base + 16 * idx, addr, length, flags, 0)
                self._free_head = following
        self.num_free -= n
        self._chain_len[head] = n
        self._writable[head] = writable
        words = self._words
        words[self._avail_idx_w + 1 + self.avail_idx % self.size] = head
        # x86 keeps stores in order: the ring entry is visible before the index that exposes it.
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        words[self._avail_idx_w] = self.avail_idx
        return head

    def add_data_chain(self, head_slot_addr: int, header_len: int, data_addr: int,
                       data_len: int, device_writes: bool, status_addr: int) -> int:
        """Fast path of add_chain for the common 3-descriptor chain: header (device-readable),
        one data buffer, status byte (device-writable).  Caller checked ``num_free >= 3``."""
        mem, base, nxt = self.mem, self.offset, self._next
        pack = _DESC.pack_into
        head = self._free_head
        second = nxt[head]
        third = nxt[second]
        pack(mem, base + 16 * head, head_slot_addr, header_len, VIRTQ_DESC_F_NEXT, second)
        pack(mem, base + 16 * second, data_addr, data_len,
             VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE if device_writes else VIRTQ_DESC_F_NEXT,
             third)
        pack(mem, base + 16 * third, status_addr, 1, VIRTQ_DESC_F_WRITE, 0)
        self._free_head = nxt[third]
        self.num_free -= 3
        self._chain_len[head] = 3
        self._writable[head] = data_len + 1 if device_writes else 1
        words = self._words
        avail_idx = self.avail_idx
        words[self._avail_idx_w + 1 + avail_idx % self.size] = head
        avail_idx = (avail_idx + 1) & 0xFFFF
        self.avail_idx = avail_idx
        words[self._avail_idx_w] = avail_idx  # last: exposes the entry (x86 orders stores)
        return head

    def needs_kick(self) -> bool:
        """Whether the device asked to be notified of what was published since the last call.

        Call after a full memory barrier (releasing a lock is one) following add_chain.
        """
        old, new = self._kicked_idx, self.avail_idx
        self._kicked_idx = new
        if old == new:
            return False
        if self.event_idx:
            avail_event = self._words[self._avail_event_w]
            # vring_need_event(): did new pass avail_event since old?
            return ((new - avail_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not (self._words[self._used_flags_w] & VIRTQ_USED_F_NO_NOTIFY)

    def has_used(self) -> bool:
        return self._words[self._used_idx_w] != self.last_used_idx

    def enable_interrupts(self) -> None:
        """Ask for a call at the next completion (used_event with EVENT_IDX, else the flag)."""
        if self.event_idx:
            self._words[self._used_event_w] = self.last_used_idx
        else:
            self._words[self._avail_off // 2] = 0

    def harvest(self) -> list[tuple[int, int]]:
        """Consume new used entries: a list of (head, written_len), descriptors freed.

        Raises RingError if the device's used index or an entry is invalid (index moved more
        than the queue size, id out of range or not in flight, length beyond what the chain
        lets the device write).  Entries before the bad one are still consumed and freed, and
        travel in the exception's ``completed``.
        """
        mem, size = self.mem, self.size
        used_idx = self._words[self._used_idx_w]
        pending = (used_idx - self.last_used_idx) & 0xFFFF
        if pending == 0:
            return []
        completed: list[tuple[int, int]] = []
        if pending > size - self.num_free:
            raise RingError(f"device moved the used index by {pending} with "
                            f"{size - self.num_free} descriptors in flight", completed)
        ring_off = self._used_off + 4
        chain_len, nxt = self._chain_len, self._next
        for _ in range(pending):
            head, length = _USED_ELEM.unpack_from(mem, ring_off + 8 * (self.last_used_idx % size))
            if head >= size or chain_len[head] == 0:
                raise RingError(f"device completed descriptor {head}, which is not an "
                                f"in-flight request head (queue size {size})", completed)
            if length > self._writable[head]:
                raise RingError(f"device reported {length} bytes written to a chain that "
                                f"allows {self._writable[head]}", completed)
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            # Return the chain to the free list, walking our own copy of `next`.
            n = chain_len[head]
            chain_len[head] = 0
            tail = head
            for _ in range(n - 1):
                tail = nxt[tail]
            nxt[tail] = self._free_head
            self._free_head = head
            self.num_free += n
            completed.append((head, length))
        return completed
