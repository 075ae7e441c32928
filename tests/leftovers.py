"""Finding qemu-storage-daemon processes left behind by a test (the plugin's own daemon with
image=, which the harness did not start and cannot stop), and killing them by PID."""
from __future__ import annotations

import os
import time

import psutil

from vblk_plugin.qsd import QSD


def qsd_processes(needle: str) -> list[psutil.Process]:
    """Running qemu-storage-daemon processes whose command line mentions ``needle``."""
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            cmdline = p.info["cmdline"] or []
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            is_qsd = p.info["name"] in (QSD, QSD[:15]) or (
                bool(cmdline) and os.path.basename(cmdline[0]) == QSD)
            if is_qsd and any(needle in arg for arg in cmdline):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_no_qsd(needle: str, timeout: float = 5.0) -> list[psutil.Process]:
    """Poll until no qemu-storage-daemon mentions ``needle``.  Returns the survivors (empty on
    success); the caller kills them by PID after failing the test."""
    deadline = time.monotonic() + timeout
    while True:
        left = qsd_processes(needle)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def kill_procs(procs: list[psutil.Process]) -> None:
    """SIGKILL the given processes by PID (clean-up after a failed no-survivor check)."""
    for p in procs:
        try:
            p.kill()
            p.wait(5)
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            pass
