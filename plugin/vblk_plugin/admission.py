"""callers=: how many nbdkit threads may be inside the device at once.

nbdkit runs 16 worker threads per connection by default, and the plugin cannot choose that.
Sixteen Python threads contending for the GIL around every wake-up cost about half the 4 KiB
throughput of four (benchmarks/README.md); more callers than that add no depth the device can
use.  Callers beyond the limit wait in ``queue.SimpleQueue.get``, which sleeps in C without
the GIL, and are let in one at a time as others leave.
"""
from __future__ import annotations

import queue
from types import TracebackType

DEFAULT_CALLERS = 4


class Admission:
    """A context manager admitting at most ``limit`` callers at once (0: no limit)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._tokens: queue.SimpleQueue[None] | None = None
        if limit > 0:
            self._tokens = queue.SimpleQueue()
            for _ in range(limit):
                self._tokens.put(None)

    def __enter__(self) -> None:
        if self._tokens is not None:
            self._tokens.get()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._tokens is not None:
            self._tokens.put(None)
