"""A request slot: everything one virtio-blk request needs, prepared once and reused.

A slot belongs to one queue and owns, at fixed addresses in the shared region, its descriptor
chain (``chain_len`` descriptors from ``head``), its header, segment and status bytes (the
queue's per-request area at ``head``) and its bounce buffer.  A request writes type, sector and
length into it and publishes the head; nothing is allocated per request.  The slot also keeps
what it takes to publish the request again on a new session (type, sector, length, segment,
and the data, which stays in the bounce buffer).

Life of a slot: free -> taken (by the thread that will wait for it) -> in flight (published)
-> finished (completed, or failed) -> free again once its owner has read the result.
"""
from __future__ import annotations

import errno
import threading

from .errors import RequestError
from .virtio_blk import (
    HEADER,
    HEADER_OFFSET,
    REQUEST_NAMES,
    SEGMENT,
    SEGMENT_OFFSET,
    STATUS_OFFSET,
    VIRTIO_BLK_S_OK,
    RequestType,
    status_error,
)
from .virtqueue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Virtqueue

_DATA_IN = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
_DEVICE_WRITES = (RequestType.IN, RequestType.GET_ID)

STATUS_UNSET = 0xFF  # preset so a device that never writes the status cannot fake success


class RequestSlot:
    """One request slot of a queue (see the module docstring).

    ``wakeup`` is held while nobody has been woken: its owner sleeps acquiring it, and the
    thread that finishes the request (or hands it the reaper role) releases it.  ``sleeping``
    and ``reaper`` are changed under the queue's lock.
    """

    __slots__ = ("queue", "head", "hdr_off", "seg_off", "status_off", "hdr_addr",
                 "seg_addr", "status_addr", "buf", "buf_off", "buf_addr", "buf_size",
                 "wakeup", "type", "sector", "length", "segment", "finished", "status",
                 "written", "ok", "error", "seq", "attempts", "generation", "sleeping", "reaper",
                 "owes_wakeup", "custom_chain")

    def __init__(self, queue: int, head: int, slot_off: int, buf: memoryview,
                 buf_off: int) -> None:
        self.queue = queue
        self.head = head
        self.hdr_off = slot_off + HEADER_OFFSET        # the queue's per-request area at head
        self.seg_off = slot_off + SEGMENT_OFFSET
        self.status_off = slot_off + STATUS_OFFSET
        self.buf = buf                   # the bounce buffer, a view made once
        self.buf_off = buf_off
        self.buf_size = len(buf)
        self.set_device_base(0)
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.type = RequestType.IN
        self.sector = 0
        self.length = 0
        self.segment: tuple[int, int, int] | None = None
        self.finished = False
        self.status = STATUS_UNSET
        self.written = 0
        self.ok = False                  # completed: status OK, a read wholly written
        self.error: Exception | None = None
        self.seq = 0
        self.attempts = 0
        self.generation = -1
        self.sleeping = False            # registered to be woken; cleared by the waker
        self.reaper = False              # its owner is (or is to become) the queue's reaper
        self.owes_wakeup = False         # owner only: a wake-up is due, acquire it once
        self.custom_chain = False        # the descriptors differ from the common 3-chain

    def set_device_base(self, base: int) -> None:
        """Device addresses from ``base``, the device address of the region's first byte."""
        self.hdr_addr = base + self.hdr_off
        self.seg_addr = base + self.seg_off
        self.status_addr = base + self.status_off
        self.buf_addr = base + self.buf_off

    def write_common_chain(self, vq: Virtqueue) -> None:
        """Write the descriptors every data request shares: header, (data), status."""
        head = self.head
        vq.write_desc(head, self.hdr_addr, HEADER.size, VIRTQ_DESC_F_NEXT, head + 1)
        vq.write_desc(head + 2, self.status_addr, 1, VIRTQ_DESC_F_WRITE, 0)
        self.custom_chain = False

    def prepare(self, vq: Virtqueue, size_max: int) -> int:
        """Write the request's header, the status preset and its chain into ``vq`` (whose
        device cuts data at ``size_max`` bytes, 0: no limit); return its writable bytes.
        The common case (data in one descriptor) rewrites only the data descriptor."""
        mem, length = vq.mem, self.length
        HEADER.pack_into(mem, self.hdr_off, self.type, 0, self.sector)
        mem[self.status_off] = STATUS_UNSET
        writes = self.type in _DEVICE_WRITES
        if self.segment is None and length and (not size_max or length <= size_max):
            if self.custom_chain:
                self.write_common_chain(vq)
            vq.write_desc(self.head + 1, self.buf_addr, length,
                          _DATA_IN if writes else VIRTQ_DESC_F_NEXT, self.head + 2)
            return length + 1 if writes else 1
        chain = [(self.hdr_addr, HEADER.size, False)]
        if self.segment is not None:
            SEGMENT.pack_into(mem, self.seg_off, *self.segment)
            chain.append((self.seg_addr, SEGMENT.size, False))
        step = size_max or length or 1
        for off in range(0, length, step):
            chain.append((self.buf_addr + off, min(step, length - off), writes))
        chain.append((self.status_addr, 1, True))
        self.custom_chain = True
        return vq.write_chain(self.head, chain)

    def check(self) -> None:
        """Raise the request's error unless it is ``ok`` (judged where it completed): the
        failure, the status byte's error or a short read (RequestError with the errno the
        client should see)."""
        if self.error is not None:
            raise self.error
        if self.ok:
            return
        if self.status != VIRTIO_BLK_S_OK:
            raise status_error(self.status, self.describe())
        raise RequestError(f"{self.describe()}: short read, the device reported "
                           f"{max(self.written - 1, 0)} of {self.length} bytes", errno.EIO)

    def describe(self) -> str:
        what = REQUEST_NAMES.get(self.type, f"request type {self.type}")
        if self.length:
            return f"{what} of {self.length} bytes at sector {self.sector}"
        return what


class SlotPool:
    """A queue's request slots.  Free ones are handed out LIFO (hot buffers stay hot) without a
    lock (list operations are atomic under the GIL); a taker that finds none waits on a
    condition of the queue's ``lock``, which a completion or a returned slot notifies."""

    def __init__(self, slots: list[RequestSlot], lock: threading.Lock) -> None:
        self.slots = slots
        self._free = list(reversed(slots))
        self.high_water = 0
        self._space = threading.Condition(lock)
        self.waiters = 0        # takers asleep in wait() (read by the queue: skip notify)

    @property
    def in_use(self) -> int:
        return len(self.slots) - len(self._free)

    def take(self) -> RequestSlot | None:
        """A free slot for the calling thread, or None at once if there is none."""
        try:
            slot = self._free.pop()
        except IndexError:
            return None
        used = len(self.slots) - len(self._free)
        if used > self.high_water:
            self.high_water = used
        slot.error = None
        slot.attempts = 0
        return slot

    def give_back(self, slot: RequestSlot) -> None:
        """Return a finished slot (its owner has read the result)."""
        self._free.append(slot)
        if self.waiters:
            with self._space:
                self._space.notify()

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds unless a slot is free."""
        with self._space:
            if not self._free:
                self.waiters += 1
                try:
                    self._space.wait(timeout)
                finally:
                    self.waiters -= 1

    def notify_locked(self) -> None:
        """Wake the takers waiting for a slot (the caller holds the queue's lock)."""
        self._space.notify_all()
