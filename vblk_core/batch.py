"""Several requests in flight for one caller: a transfer split into pieces, or a ranged
discard / write-zeroes split at the device's limit.  Every request that was submitted is
waited for, even after an error, and the first error is raised at the end.  And the data
path itself: a caller's buffer moved through bounce buffers in the shared region."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .errors import RequestError
from .memory import BouncePool
from .request import BlockRequest
from .virtio_blk import SECTOR_SIZE, RequestType


def _nothing(ok: bool) -> None:
    pass


class Batch:
    """``submit``/``wait`` are the dispatcher's; ``done(ok)`` runs once per request, in order."""

    def __init__(self, submit: Callable[[BlockRequest], None],
                 wait: Callable[[BlockRequest], None]) -> None:
        self._submit = submit
        self._wait = wait
        self._pending: deque[tuple[BlockRequest, Callable[[bool], None]]] = deque()
        self.error: BaseException | None = None

    def record(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def submit(self, req: BlockRequest, done: Callable[[bool], None] = _nothing) -> bool:
        """Submit ``req``; False (and ``done(False)`` at once) if that failed."""
        try:
            self._submit(req)
        except BaseException as e:
            self.record(e)
            done(False)
            return False
        self._pending.append((req, done))
        return True

    def finish_oldest(self) -> bool:
        """Wait for the oldest pending request; False if none was pending."""
        if not self._pending:
            return False
        req, done = self._pending.popleft()
        ok = False
        try:
            self._wait(req)
            ok = self.error is None
        except BaseException as e:
            self.record(e)
        finally:
            done(ok)
        return True

    def finish(self) -> None:
        """Wait for everything pending; raise the first error."""
        while self.finish_oldest():
            pass
        if self.error is not None:
            raise self.error


class BouncedPiece:
    """The ``done`` of one piece of a bounced transfer: copy a read's data out of its bounce
    buffer into the caller's buffer, then give the bounce buffer back."""

    __slots__ = ("mv", "pos", "view", "boff", "length", "is_read", "pool", "index")

    def __init__(self, mv: memoryview, pos: int, view: memoryview, boff: int, length: int,
                 is_read: bool, pool: BouncePool, index: int) -> None:
        self.mv, self.pos, self.view, self.boff = mv, pos, view, boff
        self.length, self.is_read, self.pool, self.index = length, is_read, pool, index

    def __call__(self, ok: bool) -> None:
        try:
            if ok and self.is_read:
                self.mv[self.pos:self.pos + self.length] = \
                    self.view[self.boff:self.boff + self.length]
        finally:
            self.pool.release(self.index)


def bounced_transfer(mv: memoryview, offset: int, is_read: bool, view: memoryview,
                     pool: BouncePool, step: int, timeout: float,
                     run: Callable[[BlockRequest], None],
                     submit: Callable[[BlockRequest], None],
                     wait: Callable[[BlockRequest], None]) -> None:
    """Move ``mv`` to (``is_read`` False) or from the device at byte ``offset`` through
    bounce buffers of ``pool`` (in the shared region ``view``), in requests of at most
    ``step`` bytes, several in flight.  Raises the first request's error."""
    req_type = RequestType.IN if is_read else RequestType.OUT
    total = len(mv)
    if total <= step:
        # Fast path: one request, one bounce buffer.
        index = pool.acquire(timeout)  # tries the lock-free path first
        try:
            boff = pool.offset_of(index)
            if not is_read:
                view[boff:boff + total] = mv
            run(BlockRequest(req_type, offset // SECTOR_SIZE, pool.addr_of(index), total,
                             is_read))
            if is_read:
                mv[:] = view[boff:boff + total]
        finally:
            pool.release(index)
        return
    batch = Batch(submit, wait)
    for pos in range(0, total, step):
        if batch.error is not None:
            break
        length = min(step, total - pos)
        free = pool.try_acquire()
        while free is None and batch.finish_oldest():
            free = pool.try_acquire()
        try:
            index = pool.acquire(timeout) if free is None else free
        except RequestError as e:
            batch.record(e)
            break
        boff = pool.offset_of(index)
        if not is_read:
            view[boff:boff + length] = mv[pos:pos + length]
        req = BlockRequest(req_type, (offset + pos) // SECTOR_SIZE, pool.addr_of(index),
                           length, is_read)
        batch.submit(req, BouncedPiece(mv, pos, view, boff, length, is_read, pool, index))
    batch.finish()
