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
from .virtio_blk import REQUEST_NAMES, VIRTIO_BLK_S_OK, RequestType, status_error

STATUS_UNSET = 0xFF  # preset so a device that never writes the status cannot fake success


class RequestSlot:
    """One request slot of a queue (see the module docstring).

    ``wakeup`` is held while nobody has been woken: its owner sleeps acquiring it, and the
    thread that finishes the request (or hands it the reaper role) releases it.  ``sleeping``
    and ``reaper`` are changed under the queue's lock.
    """

    __slots__ = ("queue", "index", "head", "hdr_off", "seg_off", "status_off", "hdr_addr",
                 "seg_addr", "status_addr", "buf", "buf_off", "buf_addr", "buf_size",
                 "wakeup", "type", "sector", "length", "segment", "finished", "status",
                 "written", "error", "seq", "attempts", "generation", "sleeping", "reaper",
                 "owes_wakeup", "custom_chain")

    def __init__(self, queue: int, index: int, head: int, slot_off: int, header_offset: int,
                 segment_offset: int, status_offset: int, buf: memoryview, buf_off: int) -> None:
        self.queue = queue
        self.index = index
        self.head = head
        self.hdr_off = slot_off + header_offset
        self.seg_off = slot_off + segment_offset
        self.status_off = slot_off + status_offset
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

    def check(self) -> None:
        """Raise the request's error, judging the status byte and the written length
        (RequestError with the errno the client should see)."""
        if self.error is not None:
            raise self.error
        if self.status != VIRTIO_BLK_S_OK:
            raise status_error(self.status, self.describe())
        if self.type == RequestType.IN and self.written != self.length + 1:
            raise RequestError(f"{self.describe()}: short read, the device reported "
                               f"{max(self.written - 1, 0)} of {self.length} bytes", errno.EIO)

    def describe(self) -> str:
        what = REQUEST_NAMES.get(self.type, f"request type {self.type}")
        if self.length:
            return f"{what} of {self.length} bytes at sector {self.sector}"
        return what
