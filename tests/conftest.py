"""The tests' fixtures for real processes, over the one harness (scripts/vblk_tools/harness.py,
which scripts/soak and the benchmarks use too; pyproject.toml puts scripts/ and plugin/ on
sys.path).  A test starts qemu-storage-daemon and nbdkit only through ``harness.Qsd`` and
``harness.Nbdkit``: directly (a module-scoped fixture, a test of the harness itself) or through
these factories, which stop by PID at teardown everything they made, nbdkit first.

    def test_x(qsd_factory, nbdkit_factory):
        qsd = qsd_factory(num_queues=4, size=64 << 20, content=b"...")     # a harness.Qsd
        kit = nbdkit_factory({"socket": qsd.socket}, stats=True)           # a harness.Nbdkit
        h = kit.connect()

Options are the harness constructors'; ``start=False`` returns one unstarted.  A daemon can be
stopped, killed and started again on the same socket and image.  ``qsd`` is a default daemon (4
queues, 64 MiB, writable) and ``device`` a ``BlockDevice`` on it, closed at teardown;
``sockdir`` a short private directory for unix sockets (a fake back-end's), removed at teardown.

Missing tools fail, never skip: ``need_program``/``need_module`` are vblk_tools.needs' checks
failing the test (at collection when called at module level) with the package to install.

After every test, each qemu-storage-daemon the harness started during it is checked: every
block node between its export and its image has ``discard=unmap`` (else trims would complete
and change nothing, and the tests that trim would prove nothing).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from vblk_plugin.qsd import QSD
from vblk_tools import harness, needs
from vblk_tools.harness import Nbdkit, Qsd, chain_without_discard

# --- what the tests need installed -------------------------------------------------------------


def need_program(name: str, package: str) -> str:
    """The full path of program ``name``, or fail naming the Debian package."""
    try:
        return needs.program(name, package, "the test")
    except needs.Missing as e:
        pytest.fail(str(e), pytrace=False)


def need_module(name: str, package: str) -> ModuleType:
    """``import name``, or fail naming the Debian package.  E.g. at module level
    ``nbd = need_module("nbd", "python3-libnbd")``."""
    try:
        return needs.module(name, package, "the test")
    except needs.Missing as e:
        pytest.fail(str(e), pytrace=False)


def need(what: Mapping[str, str], purpose: str, setup: str = needs.SETUP) -> None:
    """Fail naming every need of ``what`` (program or path -> package) that is missing."""
    try:
        needs.require(what, purpose, setup=setup)
    except needs.Missing as e:
        pytest.fail(str(e), pytrace=False)


# --- processes ---------------------------------------------------------------------------------

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
def qsd_factory(tmp_path: Path) -> Iterator[Callable[..., Qsd]]:
    """``qsd_factory(name=None, *, start=True, **options)`` -> a harness.Qsd in tmp_path
    (started unless ``start=False``).  All are stopped at teardown."""
    daemons: list[Qsd] = []

    def make(name: str | None = None, *, start: bool = True, **options: Any) -> Qsd:
        d = Qsd(tmp_path, name=name or f"qsd{len(daemons)}", **options)
        daemons.append(d)
        return d.start() if start else d

    yield make
    for d in daemons:
        d.cleanup()


@pytest.fixture
def nbdkit_factory(tmp_path: Path, qsd_factory: Callable[..., Qsd]
                   ) -> Iterator[Callable[..., Nbdkit]]:
    """``nbdkit_factory(keys, name=None, *, start=True, **options)`` -> a harness.Nbdkit
    (vblk by default) in tmp_path.  All are stopped at teardown, before qsd_factory's daemons,
    and their logs printed (pytest shows them when the test fails)."""
    kits: list[Nbdkit] = []

    def make(keys: Mapping[str, object] | Sequence[str] = (), name: str | None = None, *,
             start: bool = True, **options: Any) -> Nbdkit:
        kit = Nbdkit(tmp_path, keys, name=name or f"nbdkit{len(kits)}", **options)
        kits.append(kit)
        return kit.start() if start else kit

    yield make
    for kit in reversed(kits):
        kit.cleanup()
        print(f"--- {kit.name}: {' '.join(kit.keys)} (status {kit.returncode}):\n"
              f"{kit.log_text()}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short private directory for unix sockets, removed at teardown."""
    d = harness.private_dir("vbt-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def qsd(qsd_factory: Callable[..., Qsd]) -> Qsd:
    """A writable 64 MiB daemon with 4 queues."""
    return qsd_factory(num_queues=4)


@pytest.fixture
def device(qsd: Qsd) -> Iterator[Any]:
    """A BlockDevice on ``qsd`` (all of its queues), closed at teardown."""
    import vblk_core
    dev = vblk_core.BlockDevice.open(vblk_core.VhostUserConnector(qsd.socket))
    yield dev
    dev.close()
