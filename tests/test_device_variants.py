"""Devices that lack things, through nbdkit + the plugin: the fake back-end
(tests/fake_vhost_user.py) without DISCARD, without WRITE_ZEROES, without FLUSH, with 4096-byte
logical blocks, with an optimal I/O size, with small size_max/seg_max, with small discard and
write-zeroes limits, read-only; and a device that answers errors or breaks the ring.

For each: the exact NBD advertisement (README, "What the export advertises"), what every NBD
command becomes at the device (the fake's record), the data (the fake's disk against a model),
and that the driver never broke the device's limits (the fake records every descriptor longer
than size_max, every chain with more data descriptors than seg_max, every request of a feature
not negotiated, every unaligned request, as a violation).
"""
from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import need_module
from device_util import open_device
from fake_blk import F_CONFIG_WCE, F_DISCARD, F_FLUSH, F_WRITE_ZEROES, QSD_FEATURES
from fake_vhost_user import FakeVhostUserBlk
from vblk_core import RequestError
from vblk_tools.harness import Nbdkit
from vblk_tools.verify import close_handle

nbd = need_module("nbd", "python3-libnbd")

MiB = 1 << 20
DISK = 16 * MiB
MAX_REQUEST = 64 * MiB
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
#: Device requests the plugin makes at start-up: GET_ID, for the export's description (the
#: fake's request numbers, which io_fault_at counts, include it).
STARTUP = 1


def _without(*bits: int) -> int:
    features = QSD_FEATURES
    for b in bits:
        features &= ~(1 << b)
    return features


#: name -> (fake options, advertisement: trim, zero, fast_zero, flush, fua, read_only,
#:          block sizes (minimum, preferred, maximum))
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "like-qsd": ({}, dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                          read_only=False, sizes=(512, 4096, MAX_REQUEST))),
    "no-discard": ({"features": _without(F_DISCARD)},
                   dict(trim=False, zero=True, fast_zero=True, flush=True, fua=True,
                        read_only=False, sizes=(512, 4096, MAX_REQUEST))),
    "no-write-zeroes": ({"features": _without(F_WRITE_ZEROES)},
                        dict(trim=True, zero=True, fast_zero=False, flush=True, fua=True,
                             read_only=False, sizes=(512, 4096, MAX_REQUEST))),
    # write-through: flush is still advertised (and costs nothing), FUA too
    "no-flush": ({"features": _without(F_FLUSH, F_CONFIG_WCE)},
                 dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                      read_only=False, sizes=(512, 4096, MAX_REQUEST))),
    "4k-blocks": ({"config": {"blk_size": 4096}},
                  dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                       read_only=False, sizes=(4096, 4096, MAX_REQUEST))),
    "opt-io-64k": ({"config": {"opt_io_size": 128}},       # in logical blocks: 64 KiB
                   dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                        read_only=False, sizes=(512, 65536, MAX_REQUEST))),
    "4k-opt-io-1m": ({"config": {"blk_size": 4096, "opt_io_size": 256}},
                     dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                          read_only=False, sizes=(4096, MiB, MAX_REQUEST))),
    "small-segments": ({"config": {"size_max": 8192, "seg_max": 3}},
                       dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                            read_only=False, sizes=(512, 4096, MAX_REQUEST))),
    "small-ranges": ({"config": {"max_discard_sectors": 64, "max_write_zeroes_sectors": 64}},
                     dict(trim=True, zero=True, fast_zero=True, flush=True, fua=True,
                          read_only=False, sizes=(512, 4096, MAX_REQUEST))),
    # nbdkit advertises no write-like command on a read-only export
    "read-only": ({"read_only": True},
                  dict(trim=False, zero=False, fast_zero=False, flush=True, fua=False,
                       read_only=True, sizes=(512, 4096, MAX_REQUEST))),
}


class Served:
    """A fake back-end (a thread of this process) with nbdkit + vblk attached to it."""

    def __init__(self, workdir: Path, name: str, *, nbdkit_args: tuple[str, ...] = (),
                 keys: tuple[str, ...] = (), **fake_options: Any) -> None:
        self.disk = bytearray(random.Random(name).randbytes(DISK))
        self.model = bytearray(self.disk)
        self.fake = FakeVhostUserBlk(workdir / f"{name}.sock", self.disk, num_queues=2,
                                     **fake_options).start()
        self.server = Nbdkit(workdir, [f"socket={self.fake.path}", *keys],
                             name=f"{name}-nbdkit", stats=True,
                             nbdkit_args=["-t", "4", *nbdkit_args])
        self.server.start()
        assert [r.kind for r in self.fake.served] == ["get_id"], self.fake.served
        self.first = len(self.fake.served)     # what NBD commands caused starts here
        self.h = self.server.connect(strict=False)

    @property
    def io(self) -> list[Any]:
        """The device requests since start-up."""
        return self.fake.served[self.first:]

    def during(self, action: Callable[[], object]) -> list[str]:
        """The device requests ``action`` (NBD commands, completed on return) caused."""
        mark = len(self.fake.served)
        action()
        return [str(r) for r in self.fake.served[mark:]]

    def requests(self, action: Callable[[], object]) -> list[Any]:
        mark = len(self.fake.served)
        action()
        return list(self.fake.served[mark:])

    def write(self, data: bytes, offset: int, flags: int = 0) -> None:
        self.h.pwrite(data, offset, flags)
        self.model[offset:offset + len(data)] = data

    def zero(self, length: int, offset: int, flags: int = 0) -> None:
        self.h.zero(length, offset, flags)
        self.model[offset:offset + length] = bytes(length)

    def check_data(self) -> None:
        """The export and the device's own bytes both equal the model."""
        assert self.h.pread(DISK // 2, 0) == self.model[:DISK // 2]
        assert self.h.pread(DISK // 2, DISK // 2) == self.model[DISK // 2:]
        assert self.disk == self.model, "the device's content differs from the model"

    def close(self) -> None:
        close_handle(self.h)
        self.server.cleanup()
        self.fake.stop()


@pytest.fixture
def served(sockdir: Path) -> Iterator[Callable[..., Served]]:
    made: list[Served] = []

    def make(name: str, **kw: Any) -> Served:
        s = Served(sockdir, name, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
    for s in made:
        assert s.fake.violations == [], f"the driver broke the device's rules: " \
                                        f"{s.fake.violations[:5]}"


def _advertised(h: Any) -> dict[str, Any]:
    return dict(trim=h.can_trim(), zero=h.can_zero(), fast_zero=h.can_fast_zero(),
                flush=h.can_flush(), fua=h.can_fua(), read_only=h.is_read_only(),
                sizes=tuple(h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                                          nbd.SIZE_MAXIMUM)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_advertisement(served, variant):
    options, expected = VARIANTS[variant]
    s = served(variant, **options)
    assert _advertised(s.h) == expected
    assert s.h.can_multi_conn() is True and s.h.is_rotational() is False
    assert s.h.get_size() == DISK


# --- what each variant does with the commands --------------------------------------------------

def test_without_discard_trim_is_refused_and_nothing_reaches_the_device(served):
    s = served("nd", features=_without(F_DISCARD))
    with pytest.raises(nbd.Error) as ei:
        s.during(lambda: s.h.trim(64 * 1024, 0))
    assert ei.value.errnum in (errno.EINVAL, errno.EOPNOTSUPP), ei.value
    assert not [r for r in s.fake.served if r.kind == "discard"]
    # zero still deallocates where the device may (WRITE_ZEROES with UNMAP), flush works
    assert s.during(lambda: s.zero(64 * 1024, 0)) == ["write_zeroes(0+65536 unmap)"]
    assert s.during(lambda: s.h.flush()) == ["flush()"]
    s.check_data()


def test_without_write_zeroes_zeroes_are_written_as_data(served):
    s = served("nwz", features=_without(F_WRITE_ZEROES))
    s.write(random.Random(5).randbytes(3 * MiB), MiB)
    reqs = s.requests(lambda: s.zero(3 * MiB, MiB))
    assert reqs and all(r.kind == "write" for r in reqs), [str(r) for r in reqs]
    assert sum(r.length for r in reqs) == 3 * MiB
    reqs = s.requests(lambda: s.zero(4096, 5 * MiB, NO_HOLE | FUA))
    assert [str(r) for r in reqs] == [f"write({5 * MiB}+4096)", "flush()"]
    # fast zero is not advertised: a client honouring that never sends it (libnbd refuses
    # it itself; nbdkit 1.32 would abort on receiving it)
    s.h.set_strict_mode(nbd.STRICT_FLAGS | nbd.STRICT_COMMANDS)
    with pytest.raises(nbd.Error) as ei:
        s.during(lambda: s.h.zero(4096, 0, FAST_ZERO))
    assert ei.value.errnum in (errno.EINVAL, errno.EOPNOTSUPP)
    assert not [r for r in s.fake.served if r.kind == "write_zeroes"]
    s.check_data()


def test_without_write_zeroes_fast_zero_is_eopnotsupp_at_the_driver(tmp_path):
    """The driver under the plugin: a fast zero on a device that cannot zero natively fails
    with EOPNOTSUPP at once, sending nothing (a slow zero would not be "fast")."""
    disk = bytearray(b"\x5a" * MiB)
    with FakeVhostUserBlk(tmp_path / "f.sock", disk, features=_without(F_WRITE_ZEROES)) as fake:
        dev = open_device(fake.path)
        try:
            assert dev.can_write_zeroes is False
            mark = len(fake.served)
            with pytest.raises(RequestError) as ei:
                dev.write_zeroes(0, 65536, fast=True)
            assert ei.value.errno == errno.EOPNOTSUPP
            assert fake.served[mark:] == [] and disk == b"\x5a" * MiB
            dev.write_zeroes(0, 65536)                    # not fast: written as data
            assert disk[:65536] == bytes(65536)
        finally:
            dev.close()
        assert fake.violations == []


def test_without_flush_no_flush_is_sent(served):
    s = served("nf", features=_without(F_FLUSH, F_CONFIG_WCE))
    assert s.during(lambda: s.h.flush()) == []
    assert s.during(lambda: s.write(b"\x42" * 8192, 8192, FUA)) == ["write(8192+8192)"]
    assert s.during(lambda: s.h.trim(8192, 8192, FUA)) == ["discard(8192+8192)"]
    s.model[8192:16384] = bytes(8192)
    assert s.during(lambda: s.zero(8192, 0, FUA)) == ["write_zeroes(0+8192 unmap)"]
    assert s.fake.ops["flush"] == 0
    s.check_data()


def test_4k_blocks_refuse_unaligned_requests_and_serve_aligned_ones(served):
    s = served("4k", config={"blk_size": 4096})
    for what, command in [("read", lambda: s.h.pread(512, 4096)),
                          ("write", lambda: s.h.pwrite(b"x" * 512, 4096)),
                          ("write at 512", lambda: s.h.pwrite(b"x" * 4096, 512)),
                          ("trim", lambda: s.h.trim(512, 8192)),
                          ("zero", lambda: s.h.zero(4096 + 512, 0))]:
        with pytest.raises(nbd.Error) as ei:
            reqs = s.during(command)
            pytest.fail(f"{what} of a partial 4096-byte block succeeded: {reqs}")
        assert ei.value.errnum == errno.EINVAL, f"{what}: {ei.value}"
    assert s.io == [], [str(r) for r in s.io]
    data = random.Random(4).randbytes(3 * 4096)
    assert s.during(lambda: s.write(data, 4096)) == ["write(4096+12288)"]
    assert s.during(lambda: s.h.pread(3 * 4096, 4096)) == ["read(4096+12288)"]
    s.check_data()


def test_4k_blocks_with_the_blocksize_filter_accept_unaligned_requests(served):
    """README: put --filter=blocksize in front to have unaligned requests read-modify-written."""
    s = served("4kf", config={"blk_size": 4096}, nbdkit_args=("--filter=blocksize",))
    data = random.Random(6).randbytes(1000)
    s.write(data, 4096 + 100)
    assert s.h.pread(1000, 4096 + 100) == data
    reqs = s.fake.served
    assert all(r.sector * 512 % 4096 == 0 and r.length % 4096 == 0
               for r in reqs if r.kind in ("read", "write")), [str(r) for r in reqs]
    s.check_data()


def test_small_size_max_and_seg_max_split_every_chain(served):
    s = served("segs", config={"size_max": 8192, "seg_max": 3})
    rng = random.Random(7)
    writes = s.requests(lambda: s.write(rng.randbytes(3 * MiB + 4096), MiB - 512))
    reads = s.requests(lambda: s.h.pread(3 * MiB + 4096, MiB - 512))
    for reqs in (writes, reads):
        assert max(r.data_descriptors for r in reqs) == 3, "no chain used all 3 segments"
        assert max(r.longest_descriptor for r in reqs) == 8192
        assert sum(r.length for r in reqs) == 3 * MiB + 4096
    s.write(rng.randbytes(8192 * 3 + 512), 7 * MiB + 512, FUA)
    s.check_data()
    # the fixture asserts that no descriptor exceeded size_max and no chain seg_max


def test_small_discard_and_write_zeroes_limits_split_ranges(served):
    s = served("ranges", config={"max_discard_sectors": 64, "max_write_zeroes_sectors": 64})
    trims = s.requests(lambda: s.h.trim(MiB, 2 * MiB))
    zeroes = s.requests(lambda: s.zero(MiB + 4096, 4 * MiB, NO_HOLE))
    s.model[2 * MiB:3 * MiB] = s.disk[2 * MiB:3 * MiB]   # trimmed: the fake reads zeroes
    assert len(trims) == 32 and all(r.kind == "discard" for r in trims)
    assert len(zeroes) == 33 and all(r.kind == "write_zeroes" and not r.unmap for r in zeroes)
    for reqs in (trims, zeroes):
        assert all(n <= 64 * 512 for r in reqs for _o, n in r.extents)
    assert s.disk[2 * MiB:3 * MiB] == bytes(MiB)
    s.check_data()


def test_read_only_device_refuses_writes_before_the_device(served):
    s = served("ro", read_only=True)
    for what, command in [("write", lambda: s.h.pwrite(b"x" * 4096, 0)),
                          ("write FUA", lambda: s.h.pwrite(b"x" * 4096, 0, FUA)),
                          ("trim", lambda: s.h.trim(4096, 0)),
                          ("zero", lambda: s.h.zero(4096, 0))]:
        with pytest.raises(nbd.Error) as ei:
            command()
        assert ei.value.errnum in (errno.EPERM, errno.EROFS), f"{what}: {ei.value}"
    assert [r.kind for r in s.io] == []
    s.check_data()


# --- a hostile device's errors, through nbdkit to the client ----------------------------------

def test_device_io_error_reaches_the_client_as_eio_and_serving_goes_on(served):
    s = served("ioerr", io_fault="bad_status", bad_status=1, io_fault_at=STARTUP + 3)
    for i in range(3):
        s.write(bytes([i + 1]) * 4096, i * 4096)
    with pytest.raises(nbd.Error) as ei:
        s.h.pwrite(b"\xff" * 4096, 3 * 4096)           # the 4th request: IOERR
    assert ei.value.errnum == errno.EIO, ei.value
    assert s.fake.injected["bad_status"] == 1
    s.model[3 * 4096:4 * 4096] = s.disk[3 * 4096:4 * 4096]   # written, then reported failed
    s.write(b"\x07" * 4096, 5 * 4096)                  # the next request is served
    assert "I/O error" in s.server.log_text()
    s.check_data()


def test_device_unsupported_status_reaches_the_client(served):
    s = served("unsupp", io_fault="bad_status", bad_status=2, io_fault_at=STARTUP)
    with pytest.raises(nbd.Error) as ei:
        s.h.pread(4096, 0)
    # nbdkit sends NBD_ENOTSUP only for a fast zero; any other command gets EINVAL
    assert ei.value.errnum in (errno.EOPNOTSUPP, errno.EINVAL), ei.value
    assert s.fake.injected["bad_status"] == 1
    assert s.h.pread(4096, 0) == s.model[:4096]


def test_device_breaking_the_ring_fails_requests_with_eio(served):
    """A device that moves its used index by 1000 breaks the ring protocol: the session is
    torn down, and with reconnect-timeout=0 the client gets EIO, at once and from then on."""
    s = served("ring", io_fault="used_idx_jump", io_fault_at=STARTUP + 1,
               keys=("reconnect-timeout=0",))
    s.write(b"\x01" * 4096, 0)
    with pytest.raises(nbd.Error) as ei:
        s.h.pread(4096, 0)
    assert ei.value.errnum == errno.EIO, ei.value
    with pytest.raises(nbd.Error) as ei:
        s.h.pread(4096, 4096)
    assert ei.value.errnum == errno.EIO, ei.value
    assert s.fake.injected["used_idx_jump"] == 1
    assert "ring protocol" in s.server.log_text(), s.server.log_text()[-2000:]
    st = s.server.wait_stats(lambda st: st["state"] == "failed", 10)
    assert st is not None and st["state"] == "failed", st
