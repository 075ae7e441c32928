"""The data path: one object per device, built once, that the I/O verbs and the supervisor use.

``DataPath`` owns the shared region (every ring, every slot's header and bounce buffer, one
memfd), the queue runners and the transfer limit.  A caller's buffer is copied into or out of
a slot's bounce buffer; a request larger than a slot is cut into pieces, several in flight.
The supervisor drives its sessions: ``attach`` (map the memory, set the queues up), ``detach``
(returns the slots in flight), ``resubmit`` and ``fail``; loss is reported to the ``lost``
function passed in, and a request waits for recovery through the ``SessionGate`` passed in.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from threading import get_ident
from typing import Protocol

from .errors import DeviceError, RequestError
from .layout import VirtqueueLayout
from .memory import PAGE_SIZE, SharedRegion
from .queues import QueueRunner
from .slot import RequestSlot
from .transport import MemoryMap, Transport
from .virtio_blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    RequestType,
    VirtioBlkReqSlot,
)
from .virtqueue import Virtqueue


class SessionGate(Protocol):
    """What a request needs from the session supervisor."""

    def lost(self, reason: str, generation: int) -> None:
        """Session ``generation`` is over (a no-op if it already was)."""

    def await_session(self, timeout: float) -> None:
        """Return once requests may be published again (or ``timeout`` passed); raise
        RequestError(EIO) if the device has failed or is closed."""


def plan_slots(queue_size: int, num_queues: int, bounce_buffers: int, bounce_size: int,
               size_max: int, seg_max: int) -> tuple[int, int, int]:
    """(slots per queue, descriptors per slot, bytes per request) for a device whose segments
    are limited to ``size_max`` bytes (0: no limit) and ``seg_max`` per request."""
    data_descs = 1
    transfer = bounce_size
    if size_max:
        data_descs = max(1, min(seg_max, -(-bounce_size // size_max), queue_size - 2))
        transfer = min(bounce_size, size_max * data_descs) // 4096 * 4096 or size_max
    chain_len = max(3, data_descs + 2)
    per_queue = max(1, min(bounce_buffers // num_queues, queue_size // chain_len))
    return per_queue, chain_len, transfer


class DataPath:
    """Queues, slots and bounce buffers of one device in one allocation (see module doc)."""

    def __init__(self, num_queues: int, queue_size: int, bounce_buffers: int,
                 bounce_size: int, size_max: int, seg_max: int, event_idx: bool,
                 request_timeout: float, gate: SessionGate, spin_seconds: float = 0.0) -> None:
        per_queue, chain_len, transfer = plan_slots(queue_size, num_queues, bounce_buffers,
                                                    bounce_size, size_max, seg_max)
        self.layout = layout = VirtqueueLayout.new(num_queues, queue_size, VirtioBlkReqSlot)
        self.max_transfer = transfer
        self.request_timeout = request_timeout
        self._gate = gate
        rings_bytes = -(-layout.total_size // PAGE_SIZE) * PAGE_SIZE
        buf_size = -(-transfer // PAGE_SIZE) * PAGE_SIZE
        self.region = region = SharedRegion(rings_bytes + num_queues * per_queue * buf_size)
        view = region.view
        self.queues: list[QueueRunner] = []
        self._seq = itertools.count()   # one publish order over every queue
        for q in range(num_queues):
            vq = Virtqueue(view, q * layout.end_offset, layout, region.base_addr, 8, event_idx)
            slots = []
            for i in range(per_queue):
                head = i * chain_len
                buf_off = rings_bytes + (q * per_queue + i) * buf_size
                slots.append(RequestSlot(q, head, vq.slot_offset(head),
                                         view[buf_off:buf_off + transfer], buf_off))
            self.queues.append(QueueRunner(q, vq, slots, size_max, self._lone, spin_seconds,
                                           self._seq))
        self._device_base: int | None = None
        self._affinity: dict[int, QueueRunner] = {}
        self._next_queue = itertools.count()

    def _lone(self) -> bool:
        total = 0
        for q in self.queues:
            total += q.stats.depth
        return total == 1

    # --- the supervisor's side -------------------------------------------------------------

    def attach(self, transport: Transport, generation: int) -> None:
        """Map the region and set every queue up on ``transport`` for session
        ``generation``, then start it.  Raises what the transport raises, or DeviceError if
        it maps the memory somewhere else than the first session did."""
        region = self.region
        base = transport.map_memory(MemoryMap(region.fd, region.base_addr, region.size))
        if self._device_base is None:
            for q in self.queues:
                q.set_device_base(base)
            self._device_base = base
        elif base != self._device_base:
            # Requests in flight carry device addresses of the old mapping.
            raise DeviceError(f"{transport.target} mapped the memory at {base:#x}, not at "
                              f"{self._device_base:#x} as before")
        try:
            for q in self.queues:
                q.attach(transport, generation, self._gate.lost)
            transport.start()
        except BaseException:
            self.detach()
            raise
        for q in self.queues:
            q.start()

    def detach(self) -> list[RequestSlot]:
        """Stop every queue; the slots still in flight, oldest first."""
        survivors = [s for q in self.queues for s in q.detach()]
        survivors.sort(key=lambda s: s.seq)
        return survivors

    def resubmit(self, slots: list[RequestSlot]) -> None:
        """Publish survivors again on the current session, each on its own queue; fail
        those that cannot be."""
        for q in self.queues:
            mine = [s for s in slots if s.queue == q.index]
            for slot in q.resubmit(mine) if mine else ():
                q.fail(slot, RequestError("could not resubmit a request after reconnecting"))

    def fail(self, slot: RequestSlot, error: Exception) -> None:
        self.queues[slot.queue].fail(slot, error)

    def close(self) -> None:
        """Free the queues and the memory (after the last detach)."""
        for q in self.queues:
            q.close()
        for q in self.queues:
            for slot in q.slots:
                slot.buf.release()
        self.region.close()

    # --- requests --------------------------------------------------------------------------

    def _queue(self) -> QueueRunner:
        """The calling thread's queue: the first time, the next one round-robin (keyed by
        thread id: nbdkit gives every callback a fresh Python thread state, so
        threading.local() would forget it).  The hot paths look ``_affinity`` up first."""
        ident = threading.get_ident()
        q = self._affinity.get(ident)
        if q is None:
            q = self.queues[next(self._next_queue) % len(self.queues)]
            self._affinity[ident] = q
        return q

    def _take(self, q: QueueRunner) -> RequestSlot:
        """A free slot of ``q``, waiting for one; a queue that frees none for the request
        timeout while its requests do not complete counts as a lost session."""
        slot = q.pool.take()
        since, completed = time.monotonic(), q.stats.requests
        while slot is None:
            q.pool.wait(0.01)
            slot = q.pool.take()
            if slot is None and time.monotonic() - since >= self.request_timeout:
                if q.stats.requests == completed:
                    self._gate.lost(f"queue {q.index} stayed full with no completion for "
                                    f"{self.request_timeout:g}s", q.generation)
                since, completed = time.monotonic(), q.stats.requests
        return slot

    def _submit(self, q: QueueRunner, slot: RequestSlot) -> None:
        """Publish ``slot`` on ``q``, waiting through a reconnect.  Raises RequestError(EIO)
        if the device has failed or is closed.  (The hot paths try q.publish first.)"""
        while not q.publish(slot):
            self._gate.await_session(self.request_timeout)

    def _wait(self, q: QueueRunner, slot: RequestSlot) -> None:
        """Wait for ``slot``; a request the device sits on for the request timeout makes the
        session count as lost (recovery then resubmits or fails it).  Raises its error."""
        timeout = self.request_timeout
        while not q.wait(slot, time.monotonic() + timeout):
            self._gate.lost(f"a request did not complete within {timeout:g}s", slot.generation)
        if not slot.ok:
            slot.check()

    def read(self, mv: memoryview, offset: int) -> None:
        """Read ``len(mv)`` bytes at byte ``offset`` into ``mv`` (checked by the caller)."""
        length = len(mv)
        if length > self.max_transfer:
            return self._pieces(mv, offset, True)
        q = self._affinity.get(get_ident()) or self._queue()
        slot = q.pool.take() or self._take(q)
        try:
            slot.type, slot.sector, slot.length, slot.segment = (
                RequestType.IN, offset // SECTOR_SIZE, length, None)
            if not q.publish(slot):
                self._submit(q, slot)
            self._wait(q, slot)
            mv[:] = slot.buf[:length]
        finally:
            q.pool.give_back(slot)

    def write(self, mv: memoryview, offset: int) -> None:
        """Write ``mv`` at byte ``offset`` (checked by the caller)."""
        length = len(mv)
        if length > self.max_transfer:
            return self._pieces(mv, offset, False)
        q = self._affinity.get(get_ident()) or self._queue()
        slot = q.pool.take() or self._take(q)
        try:
            slot.buf[:length] = mv
            slot.type, slot.sector, slot.length, slot.segment = (
                RequestType.OUT, offset // SECTOR_SIZE, length, None)
            if not q.publish(slot):
                self._submit(q, slot)
            self._wait(q, slot)
        finally:
            q.pool.give_back(slot)

    def command(self, req_type: RequestType, segment: tuple[int, int, int] | None = None,
                length: int = 0) -> bytes:
        """One request without caller data (flush, get-id, a discard or write-zeroes
        segment); returns what the device wrote into the buffer (get-id)."""
        q = self._queue()
        slot = self._take(q)
        try:
            if length:
                slot.buf[:length] = bytes(length)
            slot.type, slot.sector, slot.length, slot.segment = req_type, 0, length, segment
            self._submit(q, slot)
            self._wait(q, slot)
            return bytes(slot.buf[:min(max(slot.written - 1, 0), length)])
        finally:
            q.pool.give_back(slot)

    def get_id(self) -> bytes:
        return self.command(RequestType.GET_ID, None, VIRTIO_BLK_ID_BYTES)

    def _pieces(self, mv: memoryview | None, offset: int, is_read: bool,
                ranged: tuple[RequestType, int, int, int] | None = None) -> None:
        """Several requests in flight for one caller: a transfer cut at ``max_transfer``, or
        with ``ranged`` = (type, length, bytes per request, flags) a discard / write-zeroes
        cut at the device's limit.  Every submitted request is waited for, even after an
        error; the first error is raised at the end."""
        q = self._queue()
        pending: deque[tuple[RequestSlot, int]] = deque()
        error: BaseException | None = None

        def finish_oldest() -> None:
            nonlocal error
            slot, pos = pending.popleft()
            try:
                self._wait(q, slot)
                if mv is not None and is_read and error is None:
                    mv[pos:pos + slot.length] = slot.buf[:slot.length]
            except BaseException as e:  # noqa: BLE001 - kept, raised after the rest
                error = error or e
            finally:
                q.pool.give_back(slot)

        if ranged is None:
            assert mv is not None
            total, step = len(mv), self.max_transfer
        else:
            total, step = ranged[1], ranged[2]
        for pos in range(0, total, step):
            if error is not None:
                break
            length = min(step, total - pos)
            slot = q.pool.take()
            while slot is None and pending:
                finish_oldest()
                slot = q.pool.take()
            try:
                slot = slot or self._take(q)
                if ranged is None:
                    if not is_read:
                        slot.buf[:length] = mv[pos:pos + length]  # type: ignore[index]
                    slot.type = RequestType.IN if is_read else RequestType.OUT
                    slot.sector, slot.length, slot.segment = (offset + pos) // SECTOR_SIZE, \
                        length, None
                else:
                    slot.type, slot.sector, slot.length = ranged[0], 0, 0
                    slot.segment = ((offset + pos) // SECTOR_SIZE, length // SECTOR_SIZE,
                                    ranged[3])
                self._submit(q, slot)
            except BaseException as e:  # noqa: BLE001 - kept, raised after the rest
                error = error or e
                if slot is not None:
                    q.pool.give_back(slot)
                break
            pending.append((slot, pos))
        while pending:
            finish_oldest()
        if error is not None:
            raise error

    def ranged(self, req_type: RequestType, offset: int, length: int, step: int,
               flags: int) -> None:
        """Discard or write-zeroes ``length`` bytes at ``offset``, ``step`` bytes a request."""
        self._pieces(None, offset, False, (req_type, length, step, flags))

    def stats(self) -> dict[str, object]:
        queues = [q.stats.as_dict(q.index) for q in self.queues]
        return {"queues": queues,
                "bounce_buffers_in_use": sum(q.pool.in_use for q in self.queues),
                "bounce_buffers_high_water": sum(q.pool.high_water for q in self.queues)}
