"""Several requests in flight for one caller: a transfer split into pieces, or a ranged
discard / write-zeroes split at the device's limit.  Every request that was submitted is
waited for, even after an error, and the first error is raised at the end."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .memory import BouncePool
from .request import BlockRequest


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
