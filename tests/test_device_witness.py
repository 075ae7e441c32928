"""What each NBD command becomes at the device, seen by witnesses that are not the code under
test (nbdkit + plugin/plugin.py in between, as a user runs them).

A client reading its data back cannot tell whether a flush, a FUA or a trim reached the disk:
the host's page cache serves the data either way.  So these tests look where the commands land:

- the log of qemu's blklogwrites filter (tests/dmlog.py), stacked between the daemon's file
  node and its format node: every write, flush, FUA and discard the file node received, in
  order;
- the image file itself: its allocated blocks (st_blocks) and holes (SEEK_HOLE / SEEK_DATA)
  show whether a trim or a zero deallocated anything;
- the fake back-end (tests/fake_vhost_user.py), which records every virtio-blk request with its
  type, range and flags (write-zeroes' UNMAP), and any breach of the virtio rules.

(blklogwrites logs a write-zeroes as a write of zeroes and passes no MAY_UNMAP down, so whether
a zero may deallocate is judged on a daemon without the filter, and on the fake.)
"""
from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import need_module
from dmlog import WriteLog
from fake_vhost_user import FakeVhostUserBlk
from vblk_tools import harness
from vblk_tools.harness import Nbdkit, Qsd
from vblk_tools.verify import close_handle

nbd = need_module("nbd", "python3-libnbd")

MiB = 1 << 20
SIZE = 32 * MiB
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO


def _allocated_image(path: Path, size: int, seed: int) -> bytes:
    """A fully allocated raw image of random bytes (so that deallocation shows)."""
    data = random.Random(seed).randbytes(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return data


def _blocks(path: Path) -> int:
    """Bytes allocated to the file."""
    return os.stat(path).st_blocks * 512


def _hole_at(path: Path, offset: int) -> bool:
    """Whether ``offset`` of the file is in a hole."""
    with open(path, "rb") as f:
        return os.lseek(f.fileno(), offset, os.SEEK_HOLE) == offset


def _holes_within(path: Path, offset: int, length: int) -> bool:
    """Whether any hole starts in [offset, offset+length) of the file."""
    with open(path, "rb") as f:
        return os.lseek(f.fileno(), offset, os.SEEK_HOLE) < offset + length


@dataclass
class Stack:
    backend: Qsd
    server: Nbdkit
    h: Any

    @property
    def image(self) -> Path:
        return Path(self.backend.image)

    def log(self) -> WriteLog:
        assert self.backend.write_log is not None
        return WriteLog.read(self.backend.write_log)

    def during(self, action: Callable[[], object]) -> list[str]:
        """The log entries ``action`` (NBD commands, completed on return) added, with runs of
        writes (or discards) that continue each other merged into one: how qemu cuts a
        request into pieces is not what is judged here."""
        mark = len(self.log().entries)
        action()
        merged: list[tuple[str, int, int, bool]] = []
        for e in self.log().since(mark):
            last = merged[-1] if merged else None
            if (last is not None and e.kind == last[0] in ("write", "discard")
                    and last[1] + last[2] == e.offset and e.fua == last[3]):
                merged[-1] = (last[0], last[1], last[2] + e.length, last[3])
            else:
                merged.append((e.kind, e.offset, e.length, e.fua))
        return [kind if kind == "flush" else f"{kind}({off}+{n}{' fua' if fua else ''})"
                for kind, off, n, fua in merged]


def _stack(workdir: Path, name: str, write_log: bool) -> Iterator[Stack]:
    image = workdir / f"{name}.img"
    _allocated_image(image, SIZE, seed=len(name))
    backend = Qsd(workdir, name=name, image=image, num_queues=2, write_log=write_log)
    server = Nbdkit(workdir, [f"socket={backend.socket}"], name=f"{name}-nbdkit",
                    nbdkit_args=["-t", "4"])
    try:
        backend.start()
        server.start()
        h = server.connect()
        yield Stack(backend, server, h)
        close_handle(h)
    finally:
        server.cleanup()
        backend.cleanup()


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Iterator[Stack]:
    """nbdkit (-t 4) + vblk over a daemon with a blklogwrites node, on a fully allocated
    image."""
    yield from _stack(tmp_path_factory.mktemp("logged"), "lw", write_log=True)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Iterator[Stack]:
    """The same without the filter: MAY_UNMAP reaches the file node."""
    yield from _stack(tmp_path_factory.mktemp("plain"), "pl", write_log=False)


# --- the real daemon: its write log -------------------------------------------------------------

def test_plain_write_reaches_the_device_without_a_flush(logged):
    data = random.Random(1).randbytes(64 * 1024)
    entries = logged.during(lambda: logged.h.pwrite(data, 1 * MiB))
    assert entries == [f"write({1 * MiB}+{64 * 1024})"], entries
    assert logged.log().replay(bytearray(SIZE))[1 * MiB:1 * MiB + len(data)] == data


def test_flush_after_a_write_reaches_the_device(logged):
    def write_then_flush():
        logged.h.pwrite(b"\x11" * 4096, 2 * MiB)
        logged.h.flush()
    entries = logged.during(write_then_flush)
    assert entries == [f"write({2 * MiB}+4096)", "flush"], entries


def test_flush_on_another_connection_covers_the_write(logged):
    """Multi-conn: a flush on any connection makes every connection's completed writes
    stable (one device session)."""
    other = logged.server.connect()
    try:
        def write_here_flush_there():
            logged.h.pwrite(b"\x22" * 4096, 3 * MiB)
            other.flush()
        entries = logged.during(write_here_flush_there)
    finally:
        close_handle(other)
    assert entries == [f"write({3 * MiB}+4096)", "flush"], entries


def test_fua_write_is_a_write_then_a_flush(logged):
    data = random.Random(2).randbytes(128 * 1024)
    entries = logged.during(lambda: logged.h.pwrite(data, 4 * MiB, FUA))
    # virtio-blk has no FUA bit: the plugin's FUA is the write followed by a flush, and the
    # reply waits for both
    assert entries == [f"write({4 * MiB}+{128 * 1024})", "flush"], entries


def test_trim_discards_and_frees_the_blocks(logged):
    off, n = 8 * MiB, 4 * MiB
    assert not _holes_within(logged.image, off, n), "the image was not fully allocated"
    before = _blocks(logged.image)
    entries = logged.during(lambda: logged.h.trim(n, off))
    assert entries == [f"discard({off}+{n})"], entries
    assert before - _blocks(logged.image) >= n, \
        f"trim of {n} bytes freed only {before - _blocks(logged.image)} bytes of the image"
    assert _hole_at(logged.image, off) and _hole_at(logged.image, off + n - 4096)
    assert logged.h.pread(n, off) == bytes(n)


def test_trim_with_fua_discards_then_flushes(logged):
    off, n = 14 * MiB, 1 * MiB
    entries = logged.during(lambda: logged.h.trim(n, off, FUA))
    assert entries == [f"discard({off}+{n})", "flush"], entries
    assert _hole_at(logged.image, off)


def test_zero_with_fua_zeroes_then_flushes(logged):
    off, n = 16 * MiB, 256 * 1024
    logged.h.pwrite(b"\x5a" * n, off)
    entries = logged.during(lambda: logged.h.zero(n, off, FUA | NO_HOLE))
    # blklogwrites records a write-zeroes as a write of zeroes
    assert entries == [f"write({off}+{n})", "flush"], entries
    assert logged.log().replay(bytearray(SIZE))[off:off + n] == bytes(n)


def test_large_trim_is_split_but_covers_exactly_its_range(logged):
    off, n = 4 * MiB + 512, 20 * MiB   # more than qemu 7.2's max_discard (16 MiB): split
    mark = len(logged.log().entries)
    logged.h.trim(n, off)
    entries = logged.log().since(mark)
    assert {e.kind for e in entries} == {"discard"}, [str(e) for e in entries]
    covered = sorted((e.offset, e.length) for e in entries)
    assert covered[0][0] == off and sum(length for _, length in covered) == n, covered
    assert all(a + la == b for (a, la), (b, _) in zip(covered, covered[1:], strict=False))


# --- the real daemon without the filter: does a zero deallocate? ------------------------------

def test_zero_without_no_hole_frees_the_blocks(plain):
    """NBD's zero without NO_HOLE lets the server trim (nbdkit's may-trim): the daemon punches
    a hole."""
    off, n = 20 * MiB, 4 * MiB
    assert not _holes_within(plain.image, off, n)
    before = _blocks(plain.image)
    plain.h.zero(n, off)
    assert before - _blocks(plain.image) >= n, \
        f"zero (may trim) of {n} bytes freed only {before - _blocks(plain.image)} bytes"
    assert _hole_at(plain.image, off)
    assert plain.h.pread(n, off) == bytes(n)
    with open(plain.image, "rb") as f:
        f.seek(off)
        assert f.read(n) == bytes(n)


@pytest.mark.parametrize("flags", [NO_HOLE, NO_HOLE | FAST_ZERO, NO_HOLE | FUA],
                         ids=["NO_HOLE", "NO_HOLE|FAST_ZERO", "NO_HOLE|FUA"])
def test_zero_with_no_hole_punches_no_hole(plain, flags):
    off = {NO_HOLE: 25, NO_HOLE | FAST_ZERO: 27, NO_HOLE | FUA: 29}[flags] * MiB
    n = 1 * MiB
    assert not _holes_within(plain.image, off, n)
    before = _blocks(plain.image)
    plain.h.zero(n, off, flags)
    # (SEEK_HOLE cannot judge this: ext4 reports the unwritten extents a ZERO_RANGE leaves,
    # allocated and reading as zeroes, as holes)
    assert _blocks(plain.image) >= before, \
        f"a zero with NO_HOLE deallocated {before - _blocks(plain.image)} bytes"
    assert plain.h.pread(n, off) == bytes(n)
    with open(plain.image, "rb") as f:
        f.seek(off)
        assert f.read(n) == bytes(n)


# --- the fake back-end: its record of every request -------------------------------------------

@pytest.fixture(scope="module")
def fake_stack() -> Iterator[tuple[FakeVhostUserBlk, Nbdkit, Any]]:
    d = harness.private_dir("vbw-")
    fake = FakeVhostUserBlk(d / "fake.sock", bytearray(64 * MiB), num_queues=2).start()
    server = Nbdkit(d, [f"socket={fake.path}"], name="fake-nbdkit", nbdkit_args=["-t", "4"])
    try:
        server.start()
        h = server.connect()
        yield fake, server, h
        close_handle(h)
    finally:
        server.cleanup()
        fake.stop()
        shutil.rmtree(d, ignore_errors=True)


K = 4096
#: NBD command -> the device requests it must become, exactly (in order)
COMMANDS: list[tuple[str, Callable[[Any], object], list[str]]] = [
    ("read", lambda h: h.pread(8 * K, K), [f"read({K}+{8 * K})"]),
    ("write", lambda h: h.pwrite(b"w" * 8 * K, K), [f"write({K}+{8 * K})"]),
    ("write FUA", lambda h: h.pwrite(b"f" * 8 * K, K, FUA), [f"write({K}+{8 * K})", "flush()"]),
    ("flush", lambda h: h.flush(), ["flush()"]),
    ("trim", lambda h: h.trim(16 * K, 2 * MiB), [f"discard({2 * MiB}+{16 * K})"]),
    ("trim FUA", lambda h: h.trim(16 * K, 2 * MiB, FUA),
     [f"discard({2 * MiB}+{16 * K})", "flush()"]),
    ("zero", lambda h: h.zero(16 * K, 3 * MiB), [f"write_zeroes({3 * MiB}+{16 * K} unmap)"]),
    ("zero NO_HOLE", lambda h: h.zero(16 * K, 3 * MiB, NO_HOLE),
     [f"write_zeroes({3 * MiB}+{16 * K})"]),
    ("zero FAST_ZERO", lambda h: h.zero(16 * K, 3 * MiB, FAST_ZERO),
     [f"write_zeroes({3 * MiB}+{16 * K} unmap)"]),
    ("zero NO_HOLE|FAST_ZERO", lambda h: h.zero(16 * K, 3 * MiB, NO_HOLE | FAST_ZERO),
     [f"write_zeroes({3 * MiB}+{16 * K})"]),
    ("zero FUA", lambda h: h.zero(16 * K, 3 * MiB, FUA),
     [f"write_zeroes({3 * MiB}+{16 * K} unmap)", "flush()"]),
    ("zero NO_HOLE|FUA", lambda h: h.zero(16 * K, 3 * MiB, NO_HOLE | FUA),
     [f"write_zeroes({3 * MiB}+{16 * K})", "flush()"]),
]


@pytest.mark.parametrize("what,command,expected", COMMANDS,
                         ids=[c[0].replace(" ", "-") for c in COMMANDS])
def test_each_nbd_command_becomes_exactly_these_device_requests(fake_stack, what, command,
                                                                expected):
    fake, _server, h = fake_stack
    mark = len(fake.served)
    command(h)
    got = [str(r) for r in fake.served[mark:]]
    assert got == expected, f"{what}: the device saw {got}"
    assert fake.violations == []


@pytest.mark.parametrize("what,command,kind,limit", [
    ("write 3 MiB", lambda h: h.pwrite(b"\x33" * 3 * MiB, 5 * MiB), "write", MiB),
    ("read 3 MiB", lambda h: h.pread(3 * MiB, 5 * MiB), "read", MiB),
    ("trim 40 MiB", lambda h: h.trim(40 * MiB, 9 * MiB), "discard", 16 * MiB),
    ("zero 40 MiB", lambda h: h.zero(40 * MiB, 9 * MiB), "write_zeroes", 16 * MiB),
], ids=["write", "read", "trim", "zero"])
def test_split_commands_cover_exactly_their_range(fake_stack, what, command, kind, limit):
    """Requests larger than a bounce buffer (1 MiB) or than the device's max_discard /
    max_write_zeroes (32768 sectors) become several device requests, none over the limit,
    together covering exactly the command's range, none more."""
    fake, _server, h = fake_stack
    mark = len(fake.served)
    command(h)
    reqs = fake.served[mark:]
    assert {r.kind for r in reqs} == {kind}, [str(r) for r in reqs]
    extents = sorted(x for r in reqs for x in r.extents)
    assert all(n <= limit for _o, n in extents), [str(r) for r in reqs]
    start = extents[0][0]
    for (a, na), (b, _nb) in zip(extents, extents[1:], strict=False):
        assert a + na == b, f"{what}: gap or overlap at {a + na}: {[str(r) for r in reqs]}"
    end = extents[-1][0] + extents[-1][1]
    want = {"write": (5 * MiB, 3 * MiB), "read": (5 * MiB, 3 * MiB),
            "discard": (9 * MiB, 40 * MiB), "write_zeroes": (9 * MiB, 40 * MiB)}[kind]
    assert (start, end - start) == want, f"{what}: covered {start}+{end - start}"
    if kind == "write_zeroes":
        assert all(r.unmap for r in reqs)
    assert fake.violations == []
