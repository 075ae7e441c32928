"""One virtio-blk request in flight.

A ``BlockRequest`` keeps everything needed to build its descriptor chain again (type, sector,
where its data lives), outside the rings, so a request can be resubmitted on a new session.
"""
from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING

from .errors import RequestError
from .virtio_blk import REQUEST_NAMES, VIRTIO_BLK_S_OK, RequestType, status_error

if TYPE_CHECKING:
    from .queues import QueueRunner

STATUS_UNSET = 0xFF  # preset so a device that never writes the status cannot fake success


class BlockRequest:
    """One virtio-blk request.

    ``finished`` turns True once (completed by the device or failed); ``done`` is a lock its
    waiter sleeps on, released to wake it (for completion or to hand it the reaper role).
    """

    __slots__ = ("type", "sector", "data_addr", "data_len", "device_writes", "segment",
                 "done", "finished", "status", "written", "error", "attempts", "seq",
                 "queue", "generation")

    def __init__(self, req_type: int, sector: int, data_addr: int = 0, data_len: int = 0,
                 device_writes: bool = False, segment: tuple[int, int, int] | None = None) -> None:
        self.type = req_type
        self.sector = sector
        self.data_addr = data_addr
        self.data_len = data_len
        self.device_writes = device_writes
        self.segment = segment
        self.done = threading.Lock()
        self.done.acquire()
        self.finished = False
        self.status = STATUS_UNSET
        self.written = 0
        self.error: Exception | None = None
        self.attempts = 0
        self.seq = 0
        self.queue: QueueRunner | None = None
        self.generation = -1

    def descriptor_count(self, size_max: int) -> int:
        """Descriptors this request's chain needs (header, segment, data pieces, status)."""
        n = 2 + (1 if self.segment else 0)
        if self.data_len:
            n += -(-self.data_len // size_max) if size_max else 1
        return n

    def wake(self) -> None:
        try:
            self.done.release()
        except RuntimeError:
            pass  # already released: the waiter re-checks ``finished`` anyway

    def fail(self, error: Exception) -> None:
        self.error = error
        self.finished = True
        self.wake()

    def check(self) -> None:
        """Raise the request's error, judging the status byte and the written length."""
        if self.error is not None:
            raise self.error
        if self.status != VIRTIO_BLK_S_OK:
            raise status_error(self.status, _describe(self))
        if self.type == RequestType.IN and self.written != self.data_len + 1:
            raise RequestError(f"{_describe(self)}: short read, the device reported "
                               f"{max(self.written - 1, 0)} of {self.data_len} bytes", errno.EIO)


def _describe(req: BlockRequest) -> str:
    what = REQUEST_NAMES.get(req.type, f"request type {req.type}")
    if req.data_len:
        return f"{what} of {req.data_len} bytes at sector {req.sector}"
    return what
