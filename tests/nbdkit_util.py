"""Helpers for end-to-end tests of plugin/plugin.py: nbdkit from the one harness
(scripts/vblk_tools/harness.py) in these tests' terms, and finding qemu-storage-daemon
processes left behind.  (Daemons for socket= come from conftest's ``qsd_factory``; image= mode
makes the plugin start its own.)

Everything here talks to real programs: nbdkit, qemu-storage-daemon, and libnbd's Python
binding (``import nbd``) in-process.  Sockets are unix sockets in short private directories
(a unix socket path must fit in 108 bytes, pytest's tmp_path may not).
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from types import ModuleType

import psutil
import pytest

from vblk_plugin.qsd import QSD
from vblk_tools import harness
from vblk_tools.patterns import assert_same_bytes, first_difference

__all__ = ["Nbdkit", "assert_same_bytes", "first_difference", "kill_procs", "need_module",
           "need_program", "qsd_processes", "read_file", "remove_tree",
           "run_nbdkit_expect_failure", "short_tmpdir", "wait_no_qsd"]


# --- what the tests need installed: missing means the suite fails, never skips -------------

def _missing(what: str, package: str) -> None:
    pytest.fail(f"{what} is missing: apt-get install {package} (or run scripts/setup, which "
                "installs everything the tests need)", pytrace=False)


def need_module(name: str, package: str) -> ModuleType:
    """``import name``, or fail (at collection, when called at module level) naming the
    Debian package that provides it.  E.g. ``nbd = need_module("nbd", "python3-libnbd")``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(f"Python module {name!r}", package)
        raise  # not reached: pytest.fail raised


def need_program(name: str, package: str) -> str:
    """The full path of program ``name``, or fail naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        _missing(f"program {name!r}", package)
    assert path is not None
    return path


def short_tmpdir(prefix: str = "vbt-") -> str:
    """A private directory with a short path (for unix sockets)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


class Nbdkit(harness.Nbdkit):
    """``nbdkit -f -U SOCK [-r] [EXTRA] python plugin/plugin.py KEY=VALUE...``; ``start()``
    returns once nbdkit sends the NBD greeting (the plugin's after_fork is done)."""

    def __init__(self, params: Mapping[str, object] | Sequence[str], workdir: str,
                 readonly: bool = False, extra_args: Sequence[str] = (),
                 name: str = "nbd") -> None:
        super().__init__(workdir, params, name=name, readonly=readonly,
                         nbdkit_args=extra_args)
        self.params = list(self.keys)

    def stderr(self) -> str:
        return self.log_text()


def run_nbdkit_expect_failure(params: Sequence[str], workdir: str, timeout: float = 30.0
                              ) -> tuple[int | None, str, float, bool]:
    """Run nbdkit with ``params`` that should be refused.  Returns (status, output, seconds,
    whether nbdkit's unix socket file was left behind).  If nbdkit is still running after
    ``timeout`` it is stopped and status is None."""
    k = Nbdkit(params, workdir, name="bad")
    t0 = time.monotonic()
    proc = k.launch()
    try:
        status: int | None = proc.wait(timeout)
    except Exception:  # noqa: BLE001 - TimeoutExpired: stop it and report
        status = None
    elapsed = time.monotonic() - t0
    harness.stop_process(proc)
    return status, k.log_text(), elapsed, os.path.exists(k.socket)


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


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def read_file(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()
