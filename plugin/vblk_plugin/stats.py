"""The stats= file: the device's counters as JSON, rewritten every second and at exit.

Each write goes to PATH.tmp and is renamed over PATH, so a reader never sees half a file.
No nbdkit import; the plugin passes a function returning the counters and one for warnings.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any


class StatsWriter:
    def __init__(self, path: str, source: Callable[[], dict[str, Any]],
                 warn: Callable[[str], None], interval: float = 1.0) -> None:
        self.path = path
        self.source = source
        self.warn = warn
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        """Write the counters now; a failure is reported through ``warn``, never raised."""
        tmp = self.path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.source(), f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:
            self.warn(f"cannot write stats={self.path}: {e}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vblk-stats", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def stop(self) -> None:
        """Stop the thread and write the final counters."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self.write()
