"""The per-virtqueue machinery of the block device.

A ``QueueRunner`` owns one Virtqueue and its lock: it publishes requests, kicks the device
through the transport's Kicker, and lets the waiting threads harvest completions themselves
(one reaper at a time sleeps in poll() on the call eventfd without the GIL).
"""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable

from .errors import RingError
from .eventfd import eventfd_clear_holding_gil
from .request import STATUS_UNSET, BlockRequest
from .transport import Kicker, Transport
from .virtio_blk import (
    HEADER,
    HEADER_OFFSET,
    SEGMENT,
    SEGMENT_OFFSET,
    STATUS_OFFSET,
    VIRTIO_BLK_S_OK,
    RequestType,
)
from .virtqueue import Virtqueue

log = logging.getLogger("vblk")

class QueueStats:
    """Counters of one virtqueue, read by callers (plain ints: reads need no lock)."""

    __slots__ = ("requests", "bytes", "errors", "max_depth", "depth", "kicks", "calls",
                 "spin_hits")

    def __init__(self) -> None:
        self.requests = self.bytes = self.errors = self.max_depth = 0
        self.depth = self.kicks = self.calls = self.spin_hits = 0

    def as_dict(self, index: int) -> dict[str, int]:
        return {"index": index, "requests": self.requests, "bytes": self.bytes,
                "errors": self.errors, "max_depth": self.max_depth, "in_flight": self.depth,
                "kicks": self.kicks, "calls": self.calls, "spin_hits": self.spin_hits}


class QueueRunner:
    """Drives one Virtqueue for the block device.

    Completions are harvested by the waiting threads themselves (leader/followers): one waiter
    at a time is the *reaper*, sleeping in poll() on the call eventfd without the GIL; it
    completes every finished request and wakes their waiters.  When it leaves (its own request
    is done) it hands the role to another waiter.  No extra thread, and a lone caller at
    depth 1 sleeps once per request.

    ``on_broken(reason, generation)`` is called when the device violates the ring protocol;
    the device then tears the session down.
    """

    def __init__(self, index: int, vq: Virtqueue, size_max: int,
                 on_broken: Callable[[str, int], None], spin_seconds: float = 0.0,
                 lone: Callable[[], bool] | None = None) -> None:
        self.index = index
        self.vq = vq
        self.size_max = size_max
        self.spin_ns = int(spin_seconds * 1e9)
        # Whether a request of ours is the only one in flight on the whole device (default:
        # on this queue): only then is nobody else waiting for the GIL or the CPU.
        self._lone = lone or (lambda: self.stats.depth == 1)
        self.on_broken = on_broken
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._space_waiters = 0            # our own count: Condition keeps its list private
        self._barrier_lock = threading.Lock()
        self._in_flight: dict[int, BlockRequest] = {}
        self._waiters: set[BlockRequest] = set()
        self._reaper_busy = False
        self._reaper_left = threading.Condition(self._lock)
        self._detaching = False
        self.stats = QueueStats()
        self.generation = -1
        self.call_fd = -1
        self._kick: Callable[[], None] = _not_attached
        self._poller: select.poll | None = None
        self._stopping = False

    # --- observation (tests, stats) ---------------------------------------------------------

    @property
    def reaper_busy(self) -> bool:
        """Whether a waiter is currently reaping completions."""
        return self._reaper_busy

    @property
    def sleeping_waiters(self) -> int:
        """How many waiters sleep until the reaper wakes them."""
        return len(self._waiters)

    def in_flight(self) -> list[BlockRequest]:
        """The requests published and not completed, in no particular order."""
        with self._lock:
            return list(self._in_flight.values())

    def _barrier(self) -> None:
        # Acquiring a lock is an atomic read-modify-write: a full barrier on x86, which orders
        # our ring store before the load of the device's event index (virtio's virtio_mb()).
        self._barrier_lock.acquire()
        self._barrier_lock.release()

    # --- session lifetime ------------------------------------------------------------------

    def attach(self, transport: Transport, generation: int) -> None:
        """Set this queue up on ``transport`` for session ``generation`` (a fresh call
        eventfd, the ring at index 0).  Raises what transport.setup_queue raises."""
        vq = self.vq
        call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            kicker: Kicker = transport.setup_queue(self.index, vq.size, vq.desc_addr,
                                                   vq.avail_addr, vq.used_addr, call_fd)
        except BaseException:
            os.close(call_fd)
            raise
        poller = select.poll()
        poller.register(call_fd, select.POLLIN)
        with self._lock:
            self.generation = generation
            self.call_fd = call_fd
            self._kick = kicker.kick
            self._poller = poller

    def start(self) -> None:
        with self._lock:
            self._stopping = False
            self.vq.enable_interrupts()

    def detach(self) -> list[BlockRequest]:
        """Stop reaping, close the eventfds, reset the ring; return what was in flight (not
        completed), for resubmission or failure.  Caller holds no queue lock."""
        with self._lock:
            self._stopping = True
            if self.call_fd >= 0:
                os.eventfd_write(self.call_fd, 1)  # wake the reaper out of poll()
            # The reaper leaves within one poll() timeout; its fds must stay open until then.
            self._detaching = True
            self._reaper_left.wait_for(lambda: not self._reaper_busy, 5.0)
            self._detaching = False
            # What the device completed before the session ended is done: finish it rather
            # than run it again on the next session.
            finished: list[BlockRequest] = []
            self._harvest_locked(finished)
            self._account_locked(finished)
            survivors = list(self._in_flight.values())
            self._in_flight.clear()
            self.stats.depth = 0
            self.vq.reset()
            if self.call_fd >= 0:
                os.close(self.call_fd)  # the kick side belongs to the transport
            self.call_fd = -1
            self._kick = _not_attached
            self._poller = None
            self.generation = -1
            for req in self._waiters:
                req.wake()  # let them see the new state (they loop, nothing is lost)
            self._space.notify_all()
        for req in finished:
            req.wake()
        return survivors

    # --- submission ------------------------------------------------------------------------

    def submit(self, req: BlockRequest, generation: int) -> bool | None:
        """Publish ``req`` and kick the device if it asked for it.

        Returns True if published, False if the ring has no room for it, None if the queue
        belongs to another session generation (the device is reconnecting).
        """
        with self._lock:
            published = self._publish_locked(req, generation)
            if published:
                self._kick_if_needed_locked()
            return published

    def wait_for_space(self, req: BlockRequest, timeout: float) -> None:
        """Sleep up to ``timeout`` seconds unless the ring already has room for ``req``."""
        with self._lock:
            if self.vq.num_free < req.descriptor_count(self.size_max):
                self._space_waiters += 1
                try:
                    self._space.wait(timeout)
                finally:
                    self._space_waiters -= 1

    def _publish_locked(self, req: BlockRequest, generation: int) -> bool | None:
        if self.generation != generation or self._stopping:
            return None
        vq = self.vq
        if vq.num_free < req.descriptor_count(self.size_max):
            return False
        head = vq.next_head()
        slot = vq.slot_offset(head)
        slot_addr = vq.slot_addr(head)
        mem = vq.mem
        HEADER.pack_into(mem, slot + HEADER_OFFSET, req.type, 0, req.sector)
        mem[slot + STATUS_OFFSET] = STATUS_UNSET
        if req.segment is None and req.data_len and (
                not self.size_max or req.data_len <= self.size_max):
            vq.add_data_chain(slot_addr + HEADER_OFFSET, HEADER.size, req.data_addr,
                              req.data_len, req.device_writes, slot_addr + STATUS_OFFSET)
            return self._published(head, req, generation)
        chain = [(slot_addr + HEADER_OFFSET, HEADER.size, False)]
        if req.segment is not None:
            SEGMENT.pack_into(mem, slot + SEGMENT_OFFSET, *req.segment)
            chain.append((slot_addr + SEGMENT_OFFSET, SEGMENT.size, False))
        if req.data_len:
            size_max = self.size_max
            if not size_max or req.data_len <= size_max:
                chain.append((req.data_addr, req.data_len, req.device_writes))
            else:
                for off in range(0, req.data_len, size_max):
                    chain.append((req.data_addr + off, min(size_max, req.data_len - off),
                                  req.device_writes))
        chain.append((slot_addr + STATUS_OFFSET, 1, True))
        vq.add_chain(chain)
        return self._published(head, req, generation)

    def _published(self, head: int, req: BlockRequest, generation: int) -> bool:
        self._in_flight[head] = req
        req.queue = self
        req.generation = generation
        stats = self.stats
        stats.depth += 1
        if stats.depth > stats.max_depth:
            stats.max_depth = stats.depth
        return True

    def _kick_if_needed_locked(self) -> None:
        self._barrier()
        if self.vq.needs_kick():
            self.stats.kicks += 1
            self._kick()

    # --- completion ------------------------------------------------------------------------

    def wait(self, req: BlockRequest, timeout: float) -> bool:
        """Wait until ``req`` is finished, reaping completions if no one else is.

        Returns False if ``timeout`` seconds pass first.  Never raises for the request's own
        outcome (see BlockRequest.check).
        """
        deadline = time.monotonic() + timeout
        lock = self._lock
        while not req.finished:
            with lock:
                if req.finished:
                    break
                reaper = (not self._reaper_busy and not self._stopping
                          and req.generation == self.generation)
                if reaper:
                    self._reaper_busy = True
                else:
                    self._waiters.add(req)
            if reaper:
                try:
                    self._reap_until(req, deadline)
                finally:
                    self._leave_reaper()
                if req.finished:
                    break
                if time.monotonic() >= deadline:
                    return False
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                with lock:
                    self._waiters.discard(req)
                return req.finished
            # Wake at least once a second to re-check: a lost hand-over of the reaper role
            # then costs a second, never the whole request timeout.
            req.done.acquire(timeout=min(remaining, 1.0))
            with lock:
                self._waiters.discard(req)
        return True

    def _reap_until(self, req: BlockRequest, deadline: float) -> None:
        generation = self.generation
        poller = self._poller
        call_fd = self.call_fd
        if poller is None:  # detached before we got here
            return
        while True:
            broken = self.reap()
            if broken:
                self.on_broken(broken, generation)
                return
            if req.finished or self._stopping or self.generation != generation:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.spin_ns and self._lone() and self._spin():
                continue
            poller.poll(min(remaining, 1.0) * 1000)  # sleeps without the GIL
            if eventfd_clear_holding_gil(call_fd):
                self.stats.calls += 1

    def _spin(self) -> bool:
        """A lone request (nobody else wants the GIL or the CPU for another request) watches
        the used ring for spin_ns before sleeping: a completion seen here costs no wake-up
        (and, with the threads on different CPUs, no cross-CPU wake-up latency).  True if one
        arrived."""
        has_used, now = self.vq.has_used, time.perf_counter_ns
        end = now() + self.spin_ns
        while now() < end:
            if has_used():
                self.stats.spin_hits += 1
                return True
        return False

    def _leave_reaper(self) -> None:
        with self._lock:
            self._reaper_busy = False
            if self._detaching:
                self._reaper_left.notify_all()
            # Hand the role to a thread that is asleep waiting for an unfinished request.
            for other in self._waiters:
                if not other.finished:
                    other.wake()
                    break

    def _harvest_locked(self, finished: list[BlockRequest]) -> str | None:
        """Move the device's new used entries into ``finished`` (caller holds the lock).
        Returns a reason if the device broke the ring protocol; entries before the bad one
        are still finished."""
        vq, in_flight, mem = self.vq, self._in_flight, self.vq.mem
        broken = None
        try:
            entries = vq.harvest()
        except RingError as e:
            entries = e.completed
            broken = f"queue {self.index}: {e}"
        for head, written in entries:
            req = in_flight.pop(head)
            req.status = mem[vq.slot_offset(head) + STATUS_OFFSET]
            req.written = written
            req.finished = True
            finished.append(req)
        return broken

    def _account_locked(self, finished: list[BlockRequest]) -> None:
        stats = self.stats
        stats.depth -= len(finished)
        stats.requests += len(finished)
        for req in finished:
            if req.status != VIRTIO_BLK_S_OK or (
                    req.type == RequestType.IN and req.written != req.data_len + 1):
                stats.errors += 1
            elif req.type != RequestType.GET_ID:
                stats.bytes += req.data_len

    def reap(self) -> str | None:
        """Harvest completions and wake their waiters.  Returns a reason if the device broke
        the ring protocol (the session must then be torn down), else None."""
        finished: list[BlockRequest] = []
        broken = None
        with self._lock:
            if self._stopping:
                return None
            vq = self.vq
            while True:
                broken = self._harvest_locked(finished)
                if broken:
                    break
                vq.enable_interrupts()
                self._barrier()
                if not vq.has_used():
                    break
            if finished:
                self._account_locked(finished)
                if self._space_waiters:  # skip the call when no submitter waits for room
                    self._space.notify_all()
        for req in finished:
            req.wake()
        if broken:
            log.error("vblk: device broke the ring protocol: %s", broken)
        return broken


def _not_attached() -> None:
    """The kick of a queue with no session: nothing to notify (recovery resubmits)."""
