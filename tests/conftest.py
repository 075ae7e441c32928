"""Shared fixtures: a real qemu-storage-daemon (vhost-user-blk back-end) and a BlockDevice on it.

The processes come from the one harness, scripts/vblk_tools/harness.py (pyproject.toml puts
scripts/ and plugin/ on sys.path): the daemon's argv is vblk_plugin.qsd.qsd_argv, with
discard=unmap on both block nodes, and it counts as started once its socket accepts a
connection.

``qsd_factory(...)`` starts a daemon on a fresh raw image in the test's tmp_path and returns a
``QsdDaemon``; every daemon it made is stopped by PID at teardown (SIGTERM, wait, SIGKILL).
A daemon can be stopped, killed (``kill()`` = SIGKILL) and started again on the same socket and
image, which the reliability and plugin tests rely on.

    def test_x(qsd_factory):
        qsd = qsd_factory(num_queues=4, size=64 << 20, writable=True, content=b"...")
        dev = BlockDevice.open(VhostUserConnector(qsd.socket)) ...

``qsd`` is a default daemon (4 queues, 64 MiB, writable) and ``device`` a ``BlockDevice`` on
it, closed at teardown.  ``pattern`` is re-exported from vblk_tools.patterns for older tests.

After every test, each qemu-storage-daemon the harness started during it is checked: every
block node between its export and its image has ``discard=unmap`` (else trims would complete
and change nothing, and the tests that trim would prove nothing).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from vblk_plugin.qsd import QSD
from vblk_tools import harness
from vblk_tools.harness import HarnessError, PathLike, Qsd, chain_without_discard
from vblk_tools.patterns import first_difference, pattern

__all__ = ["QsdDaemon", "first_difference", "pattern"]


class QsdDaemon(Qsd):
    """One qemu-storage-daemon exporting a raw image as vhost-user-blk on a unix socket; a
    failure to start fails the test (with the daemon's log) instead of raising."""

    def start(self, timeout: float = 15.0, image: PathLike | None = None) -> Self:
        try:
            super().start(timeout, image)
        except HarnessError as e:
            pytest.fail(f"{e}\ncommand: {' '.join(self.command(image))}", pytrace=False)
        return self


_checked = 0     # how many of harness.history daemons_discard_unmap has judged


@pytest.fixture(autouse=True)
def daemons_discard_unmap() -> Iterator[None]:
    """Every qemu-storage-daemon started through the harness since the last check (during the
    test, or by a module fixture before it) had discard=unmap on every node of its export's
    chain."""
    global _checked
    yield
    new, _checked = harness.history[_checked:], len(harness.history)
    for argv in new:
        if any(os.path.basename(a) == QSD for a in argv):
            missing = chain_without_discard(argv)
            assert not missing, (f"a daemon was started without discard=unmap on "
                                 f"{', '.join(missing)}: {' '.join(argv)}")


@pytest.fixture
def qsd_factory(tmp_path: Path) -> Iterator[Callable[..., QsdDaemon]]:
    """``qsd_factory(**kwargs)`` -> a started QsdDaemon (options: those of
    vblk_tools.harness.Qsd); pass ``start=False`` to get it unstarted.  All are stopped at
    teardown."""
    daemons: list[QsdDaemon] = []

    def make(name: str | None = None, *, start: bool = True, **kwargs: Any) -> QsdDaemon:
        d = QsdDaemon(tmp_path, name=name or f"qsd{len(daemons)}", **kwargs)
        daemons.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in daemons:
        d.cleanup()


@pytest.fixture
def qsd(qsd_factory: Callable[..., QsdDaemon]) -> QsdDaemon:
    """A writable 64 MiB daemon with 4 queues."""
    return qsd_factory(num_queues=4)


@pytest.fixture
def device(qsd: QsdDaemon) -> Iterator[Any]:
    """A BlockDevice on ``qsd`` (all of its queues), closed at teardown."""
    import vblk_core
    dev = vblk_core.BlockDevice.open(vblk_core.VhostUserConnector(qsd.socket))
    yield dev
    dev.close()
