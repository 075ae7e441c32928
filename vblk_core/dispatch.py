"""Dispatch: which queue a request goes to, waiting for room when its ring is full, and
noticing a device that stopped completing (the session then counts as lost).

Callers keep to one queue per OS thread, spread round-robin (keyed by thread id: nbdkit gives
every callback a fresh Python thread state, so threading.local() would forget the choice).
"""
from __future__ import annotations

import errno
import itertools
import threading
import time

from .errors import RequestError
from .queues import QueueRunner
from .request import BlockRequest
from .supervisor import DeviceState, Supervisor


class Dispatcher:
    """Submits requests to ``queues`` and waits for them, under ``supervisor``'s state."""

    def __init__(self, supervisor: Supervisor, request_timeout: float) -> None:
        self.supervisor = supervisor
        self.request_timeout = request_timeout
        self.queues: list[QueueRunner] = []
        self._seq = itertools.count()
        self._rr = itertools.count()
        self._affinity: dict[int, QueueRunner] = {}

    def queue_broken(self, reason: str, generation: int) -> None:
        """A queue's device broke the ring protocol: the session is over."""
        self.supervisor.lost(f"device broke the virtqueue protocol ({reason})", generation)

    def _pick_queue(self) -> QueueRunner:
        ident = threading.get_ident()
        q = self._affinity.get(ident)
        if q is None:
            q = self.queues[next(self._rr) % len(self.queues)]
            self._affinity[ident] = q
        return q

    def submit(self, req: BlockRequest) -> None:
        """Publish ``req`` on a queue (waiting for room or for a reconnect).  Raises
        RequestError(EIO) if the device has failed or is closed."""
        supervisor = self.supervisor
        req.seq = next(self._seq)
        q: QueueRunner | None = None
        stalled: tuple[int, float] | None = None  # (completions seen, since when), ring full
        while True:
            state = supervisor.state
            if state is DeviceState.CONNECTED:
                q = q or self._pick_queue()
                generation = supervisor.generation
                published = q.submit(req, generation)
                if published:
                    return
                if published is False:
                    # Ring full: reap what is done (a waiter may not be reaping right now).
                    broken = q.reap()
                    now = time.monotonic()
                    if stalled is None or stalled[0] != q.stats.requests:
                        stalled = (q.stats.requests, now)
                    if broken:
                        self.queue_broken(broken, generation)
                    elif now - stalled[1] >= self.request_timeout:
                        # Nothing completed for request_timeout: the device sits on the ring,
                        # and the requests in it may be our own (nobody else would notice).
                        supervisor.lost(f"queue {q.index} stayed full with no completion "
                                        f"for {self.request_timeout:g}s", generation)
                        stalled = None
                    else:
                        q.wait_for_space(req, 0.002)
                continue
            if state is DeviceState.RECOVERING:
                supervisor.wait_while_recovering(self.request_timeout)
                continue
            raise RequestError(supervisor.unavailable_reason(), errno.EIO)

    def wait(self, req: BlockRequest) -> None:
        """Wait for ``req`` (without the GIL) and raise its error.  A request the device sits
        on for longer than request_timeout makes the session count as lost; recovery then
        resubmits or fails it."""
        while not req.finished:
            q = req.queue
            if q is not None and q.wait(req, self.request_timeout):
                break
            if q is None:
                req.done.acquire(timeout=self.request_timeout)
            elif not req.finished:
                self.supervisor.lost(
                    f"a request did not complete within {self.request_timeout:g}s",
                    req.generation)
        req.check()

    def run(self, req: BlockRequest) -> None:
        self.submit(req)
        self.wait(req)

    def resubmit(self, req: BlockRequest) -> None:
        """Publish a survivor of a lost session again, on its old queue (or fail it)."""
        q = req.queue or self.queues[0]
        if not q.submit(req, self.supervisor.generation):
            req.fail(RequestError("could not resubmit a request after reconnecting", errno.EIO))
