"""The reliability tests' names for the one harness (scripts/vblk_tools): a back-end that is
killed and started again, and nbdkit+vblk attached to it, with these tests' defaults.

    backend = Backend(workdir, size=64 << 20).start()            # 4 queues
    server = Server(workdir, backend.socket, reconnect_timeout=30).start()
    worker = VerifiedWorker(server.socket, 0, 8 << 20, depth=8, seed=1)
    ...
    server.stop(); backend.stop()
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vblk_tools.harness import HarnessError, Nbdkit, Qsd, spawn, stop_process
from vblk_tools.verify import (
    ANY,
    EXACT,
    OLD_OR_ZERO,
    VerifiedWorker,
    close_handle,
    run_aio,
    run_workers,
)

__all__ = ["ANY", "EXACT", "OLD_OR_ZERO", "Backend", "HarnessError", "Server", "VerifiedWorker",
           "close_handle", "run_aio", "run_workers", "spawn", "stop_process"]


class Backend(Qsd):
    """qemu-storage-daemon (4 queues by default) on a fresh 64 MiB image in ``workdir``."""

    def __init__(self, workdir: Path | str, *, name: str = "qsd", num_queues: int = 4,
                 **kw: Any) -> None:
        super().__init__(workdir, name=name, num_queues=num_queues, **kw)


class Server(Nbdkit):
    """nbdkit serving plugin/plugin.py attached to ``vhost_socket``, writing its stats file."""

    def __init__(self, workdir: Path | str, vhost_socket: str, *, name: str = "nbdkit",
                 reconnect_timeout: float | None = None, stats: bool = True,
                 extra: Sequence[str] = (), nbdkit_args: Sequence[str] = ()) -> None:
        keys = [f"socket={vhost_socket}"]
        if reconnect_timeout is not None:
            keys.append(f"reconnect-timeout={reconnect_timeout:g}")
        super().__init__(workdir, keys + list(extra), name=name, stats=stats,
                         nbdkit_args=nbdkit_args)
        self.vhost_socket = vhost_socket
