"""One virtqueue of the block device with its request slots: publish, reap, wake.

A ``QueueRunner`` owns a Virtqueue, the request slots carved from the queue's descriptors and
bounce buffers, one lock and one call eventfd (kept for its whole life, across sessions).

Completions are harvested by the waiting threads themselves (leader/followers).  Whoever
publishes a request while nobody reaps becomes the *reaper*; everyone else is registered as a
sleeper in the same lock hold.  The reaper looks at the used ring without the lock (with device
notifications off while it spins; on, with a re-check after a barrier, before it sleeps in
poll() without the GIL), then takes the lock once to complete every used entry and wake those
requests' owners.  When its own request is done it hands the role to the oldest sleeper.  So a
request costs two lock acquisitions (publish, complete) and at most one wake-up.
"""
from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

from .errors import RingError
from .eventfd import eventfd_clear_holding_gil, eventfd_write_holding_gil
from .slot import RequestSlot, SlotPool
from .transport import Kicker, Transport
from .virtio_blk import VIRTIO_BLK_S_OK, RequestType
from .virtqueue import Virtqueue

log = logging.getLogger("vblk")


LostCallback = Callable[[str, int], None]


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


def _not_attached() -> None:
    """The kick of a queue with no session: nothing to notify (recovery resubmits)."""


def _no_loss(reason: str, generation: int) -> None:
    """The loss callback of a queue with no session."""


class QueueRunner:
    """Drives virtqueue ``vq`` (queue ``index``) with ``slots`` (their heads ``chain_len``
    apart).  ``size_max`` is the device's segment limit (0: none); ``lone()`` says whether one
    request is in flight on the whole device (only then may the reaper spin for
    ``spin_seconds``)."""

    def __init__(self, index: int, vq: Virtqueue, slots: list[RequestSlot], size_max: int,
                 lone: Callable[[], bool], spin_seconds: float = 0.0,
                 sequence: Iterator[int] | None = None) -> None:
        self.index = index
        self.vq = vq
        self.slots = slots
        self.size_max = size_max
        self._by_head: list[RequestSlot | None] = [None] * vq.size
        for slot in slots:
            self._by_head[slot.head] = slot
        self.spin_ns = int(spin_seconds * 1e9)
        self._lone = lone
        self._seq = sequence if sequence is not None else itertools.count()  # publish order
        self._lock = threading.Lock()
        self._barrier_lock = threading.Lock()
        self.pool = SlotPool(slots, self._lock)
        self._reaper: RequestSlot | None = None
        self._reaper_spins = False           # the role's holder starts by spinning
        self._reaper_left = threading.Condition(self._lock)
        self._detaching = False
        self._sleepers: dict[RequestSlot, None] = {}   # insertion order = publish order
        self._live = False
        self.generation = -1
        self._kick: Callable[[], None] = _not_attached
        self._on_lost: LostCallback = _no_loss
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(self.call_fd, select.POLLIN)
        self.stats = QueueStats()

    # --- observation -----------------------------------------------------------------------

    @property
    def reaper_busy(self) -> bool:
        """Whether some thread holds the reaper role."""
        return self._reaper is not None

    @property
    def sleeping_waiters(self) -> int:
        return len(self._sleepers)

    # --- session lifetime ------------------------------------------------------------------

    def set_device_base(self, base: int) -> None:
        """The device address of the shared region's first byte: place the ring and every
        slot, and write every slot's descriptor chain in its common shape."""
        self.vq.set_device_base(base)
        for slot in self.slots:
            slot.set_device_base(base)
            slot.write_common_chain(self.vq)

    def attach(self, transport: Transport, generation: int, on_lost: LostCallback) -> None:
        """Set the queue up on ``transport`` for session ``generation`` (ring at index 0);
        ``on_lost(reason, generation)`` is told if the device breaks the ring protocol.
        Raises what transport.setup_queue raises."""
        vq = self.vq
        kicker: Kicker = transport.setup_queue(self.index, vq.size, vq.desc_addr,
                                               vq.avail_addr, vq.used_addr, self.call_fd)
        with self._lock:
            self.generation = generation
            self._kick = kicker.kick
            self._on_lost = on_lost

    def start(self) -> None:
        with self._lock:
            self._live = True

    def detach(self) -> list[RequestSlot]:
        """End the session: make the reaper leave, finish what the device completed, reset
        the ring; return the slots still in flight (their owners sleep until they are
        resubmitted or failed)."""
        with self._lock:
            self._live = False
            if self._reaper is not None:
                eventfd_write_holding_gil(self.call_fd)  # out of poll(), or soon
                self._detaching = True
                self._reaper_left.wait_for(lambda: self._reaper is None, 5.0)
                self._detaching = False
                self._reaper = None
            self._complete_locked()
            by_head = self._by_head
            survivors = [s for h in self.vq.in_flight_heads() if (s := by_head[h]) is not None]
            self.vq.reset()
            self.stats.depth = 0
            self.generation = -1
            self._kick = _not_attached
            self._on_lost = _no_loss
            self.pool.notify_locked()
        return survivors

    def close(self) -> None:
        """Release the call eventfd (after detach; nothing may use the queue afterwards)."""
        if self.call_fd >= 0:
            self._poller.unregister(self.call_fd)
            os.close(self.call_fd)
            self.call_fd = -1
        self.vq.release()

    # --- publishing ------------------------------------------------------------------------

    def publish(self, slot: RequestSlot) -> bool:
        """Publish the request in ``slot`` (type, sector, length, segment set; data in its
        buffer) and kick the device if it asked.  False if the queue has no session now."""
        writable = slot.prepare(self.vq, self.size_max)
        vq = self.vq
        with self._lock:
            if not self._live:
                return False
            old = vq.avail_idx
            vq.publish(slot.head, writable)
            slot.finished = False
            slot.generation = self.generation
            slot.seq = next(self._seq)
            stats = self.stats
            stats.depth += 1
            if stats.depth > stats.max_depth:
                stats.max_depth = stats.depth
            if self._reaper is None:
                self._take_role_locked(slot)
            else:
                self._sleep_locked(slot)
            kick = self._kick
        # Releasing the lock was a full barrier: the device's event index is read after it.
        if vq.needs_kick(old, vq.avail_idx):
            self.stats.kicks += 1
            kick()
        return True

    def _take_role_locked(self, slot: RequestSlot) -> bool:
        """Make ``slot``'s owner the reaper (or keep it so, after each harvest) and choose how
        it looks next: spinning (a lone request; notifications off) or sleeping
        (notifications on; the lock's release is the barrier before its re-check).
        Returns whether it spins."""
        self._reaper = slot
        slot.reaper = True
        spins = self._reaper_spins = bool(self.spin_ns) and self._lone()
        if spins:
            self.vq.disable_notifications()
        else:
            self.vq.enable_notifications()
        return spins

    def resubmit(self, slots: list[RequestSlot]) -> list[RequestSlot]:
        """Publish the survivors of a lost session again, in order; returns those that could
        not be (the queue has no session).  Their owners are asleep (or about to be): the
        oldest is handed the reaper role."""
        vq = self.vq
        with self._lock:
            if not self._live:
                return slots
            old = vq.avail_idx
            stats = self.stats
            for slot in slots:
                vq.publish(slot.head, slot.prepare(vq, self.size_max))
                slot.finished = False
                slot.generation = self.generation
                stats.depth += 1
                if not slot.sleeping and not slot.reaper:
                    self._sleep_locked(slot)
            stats.max_depth = max(stats.max_depth, stats.depth)
            self._hand_over_locked(oldest_first=True)
            kick = self._kick
        if vq.needs_kick(old, vq.avail_idx):
            self.stats.kicks += 1
            kick()
        return []

    def fail(self, slot: RequestSlot, error: Exception) -> None:
        """Finish ``slot`` with ``error`` (its session is gone) and wake its owner."""
        with self._lock:
            slot.error = error
            slot.ok = False
            slot.finished = True
            if slot.sleeping:
                self._wake_locked(slot)

    # --- completion ------------------------------------------------------------------------

    def wait(self, slot: RequestSlot, deadline: float) -> bool:
        """Wait until ``slot`` is finished, reaping completions while holding the role.
        False if ``deadline`` (time.monotonic()) passes first; call again to go on."""
        while True:
            if slot.owes_wakeup:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # At most a second at a time: a lost wake-up costs a second, never more.
                if not slot.wakeup.acquire(timeout=min(remaining, 1.0)):
                    continue
                slot.owes_wakeup = False
            if slot.reaper:
                self._reap(slot, deadline)
                if not slot.finished and time.monotonic() >= deadline:
                    return False
                continue
            if slot.finished:
                return True
            with self._lock:   # neither role nor registration: a session ended under it
                if not slot.finished and not slot.reaper and not slot.owes_wakeup:
                    self._register_locked(slot)

    def _register_locked(self, slot: RequestSlot) -> None:
        if self._reaper is None and self._live and slot.generation == self.generation:
            self._take_role_locked(slot)
        else:
            self._sleep_locked(slot)

    def _sleep_locked(self, slot: RequestSlot) -> None:
        """Register ``slot``'s owner as a sleeper: it acquires ``wakeup`` once, which the
        thread that finishes the request or hands it the reaper role releases."""
        slot.sleeping = slot.owes_wakeup = True
        self._sleepers[slot] = None

    def _reap(self, slot: RequestSlot, deadline: float) -> None:
        vq, generation = self.vq, slot.generation
        spins = self._reaper_spins
        while True:
            if not vq.has_used():
                if not (spins and self._watch(vq)):
                    if spins:
                        vq.enable_notifications()
                        self._barrier()
                    if not vq.has_used():
                        timeout = min(max(deadline - time.monotonic(), 0.0), 1.0)
                        self._poller.poll(timeout * 1000)   # sleeps without the GIL
                        if eventfd_clear_holding_gil(self.call_fd):
                            self.stats.calls += 1
                    vq.disable_notifications()  # we are looking now
            with self._lock:
                if not self._live or generation != self.generation:
                    self._leave_locked(slot)
                    return
                broken = self._complete_locked()
                if broken:
                    self._live = False   # no hand-over, no publishing: the session is over
                if broken or slot.finished or time.monotonic() >= deadline:
                    self._leave_locked(slot)
                    on_lost = self._on_lost
                    break
                spins = self._take_role_locked(slot)
        if broken:
            log.error("vblk: device broke the ring protocol: %s", broken)
            on_lost(f"device broke the virtqueue protocol ({broken})", generation)

    def _watch(self, vq: Virtqueue) -> bool:
        if vq.watch_used(self.spin_ns):
            self.stats.spin_hits += 1
            return True
        return False

    def _barrier(self) -> None:
        # An atomic read-modify-write: a full barrier on x86 (virtio's virtio_mb()), which
        # orders our used_event store before the load of the device's used index.
        self._barrier_lock.acquire()
        self._barrier_lock.release()

    def _leave_locked(self, slot: RequestSlot) -> None:
        slot.reaper = False
        if self._reaper is slot:
            self._reaper = None
            if self._live and self._sleepers:
                self._hand_over_locked()
            if self._detaching:   # (a Condition's notify costs a lock attempt)
                self._reaper_left.notify_all()
        if not slot.finished:   # a sleeper until resubmitted, failed or handed the role
            self._sleep_locked(slot)

    def _hand_over_locked(self, oldest_first: bool = False) -> None:
        """Give the reaper role to a sleeper, if nobody holds it: the first registered (the
        oldest request, so a thread waiting for its pieces in order never sleeps on one while
        the role waits on a later one), or with ``oldest_first`` the lowest sequence number
        (after a resubmission the registration order is the old session's)."""
        if self._reaper is not None or not self._sleepers:
            return
        if oldest_first:
            chosen = min(self._sleepers, key=_seq)
        else:
            chosen = next(iter(self._sleepers))
        self._take_role_locked(chosen)
        self._wake_locked(chosen)

    def _wake_locked(self, slot: RequestSlot) -> None:
        """Wake the sleeping owner of ``slot`` (finished, or handed the role)."""
        slot.sleeping = False
        del self._sleepers[slot]
        slot.wakeup.release()

    def _complete_locked(self) -> str | None:
        """Complete every used entry and wake the owners (caller holds the lock).  Returns
        why the ring is broken, if it is; entries before the bad one are still completed."""
        broken = None
        try:
            entries = self.vq.harvest()
        except RingError as e:
            entries = e.completed
            broken = f"queue {self.index}: {e}"
        if not entries:
            return broken
        mem, by_head, stats = self.vq.mem, self._by_head, self.stats
        for head, written in entries:
            slot = by_head[head]
            assert slot is not None  # harvest accepts only heads we published
            slot.status = status = mem[slot.status_off]
            slot.written = written
            # The one judgement of a completion (slot.check() explains a failed one).
            slot.ok = ok = status == VIRTIO_BLK_S_OK and (slot.type != RequestType.IN
                                                          or written == slot.length + 1)
            if not ok:
                stats.errors += 1
            elif slot.type != RequestType.GET_ID:
                stats.bytes += slot.length
            slot.finished = True
            if slot.sleeping:
                self._wake_locked(slot)
        stats.depth -= len(entries)
        stats.requests += len(entries)
        if self.pool.waiters:   # (a Condition's notify costs a lock attempt)
            self.pool.notify_locked()
        return broken


def _seq(slot: RequestSlot) -> int:
    return slot.seq
