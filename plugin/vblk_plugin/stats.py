"""The stats= file: the device's counters as JSON, rewritten every second and at exit.

Each write goes to a private temporary file, created exclusively (O_EXCL, a random name) in
PATH's directory, and is renamed over PATH: a reader never sees half a file, and no one can
redirect the write.  (A fixed name such as PATH.tmp, opened for writing, would follow a symlink
another local user planted there in a world-writable directory, and nbdkit, often root, would
truncate and rewrite whatever file it points at every second.)  The rename replaces PATH
itself, even if PATH is a symlink, and never writes through it.

``check_path`` refuses at start-up a PATH whose directory nbdkit cannot write.  No nbdkit import;
the plugin passes a function returning the counters and one for warnings.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from vblk_core.errors import ConfigError


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _temporary(path: str) -> tuple[int, str]:
    """A new private file (mode 0600) beside ``path``: (fd, name).  Raises OSError."""
    directory, name = os.path.split(path)
    return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)


def check_path(path: str) -> None:
    """Raises ConfigError (naming stats= and the fix) unless the stats file can be written at
    the absolute ``path``: its directory exists and nbdkit can create files in it (tried
    for real: permissions, read-only mounts and the like all count), and it is no directory."""
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigError(f"stats={path}: directory {directory} does not exist: create it or "
                          "give stats= a path in an existing directory")
    if os.path.isdir(path):
        raise ConfigError(f"stats={path} is a directory: give the path of a file, e.g. "
                          f"stats={os.path.join(path, 'vblk-stats.json')}")
    try:
        fd, tmp = _temporary(path)
    except OSError as e:
        raise ConfigError(f"stats={path}: nbdkit cannot create files in {directory} "
                          f"({e.strerror}): give stats= a path in a directory it can "
                          "write") from None
    os.close(fd)
    os.unlink(tmp)


class StatsWriter:
    def __init__(self, path: str, source: Callable[[], dict[str, Any]],
                 warn: Callable[[str], None], interval: float = 1.0) -> None:
        self.path = path
        self.source = source
        self.warn = warn
        self.interval = interval
        self._mode = 0o666 & ~_umask()    # what open(PATH, "w") would have given the file
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        """Write the counters now; a failure is reported through ``warn``, never raised."""
        try:
            text = json.dumps(self.source(), indent=1)
            fd, tmp = _temporary(self.path)
        except OSError as e:
            self.warn(f"cannot write stats={self.path}: {e}")
            return
        try:
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), self._mode)
                f.write(text)
            os.replace(tmp, self.path)
        except OSError as e:
            self.warn(f"cannot write stats={self.path}: {e}")
            try:
                os.unlink(tmp)
            except OSError:
                pass

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
