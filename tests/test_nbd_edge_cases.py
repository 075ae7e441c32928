"""NBD requests at the edges, sent through libnbd with strict mode off (so libnbd passes on what
a careless or hostile client would send) to nbdkit+vblk over qemu-storage-daemon (issue 5).

For every request: the server answers (success with correct data, or a sane errno), never
corrupts bytes next to the request, and keeps serving.  A disconnect with requests in flight
leaks nothing (the stats JSON, rewritten every second, shows in_flight 0 and no bounce buffer
in use once idle).
"""
from __future__ import annotations

import itertools
import os
import random
import time

import pytest

from conftest import need_module

nbd = need_module("nbd", "python3-libnbd")

from vblk_tools.harness import Nbdkit, Qsd  # noqa: E402
from vblk_tools.verify import close_handle  # noqa: E402

MiB = 1 << 20
SIZE = 160 * MiB
FUA, NO_HOLE, FAST_ZERO = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO
FLAG_COMBOS = [sum(c) for n in range(4)
               for c in itertools.combinations((FUA, NO_HOLE, FAST_ZERO), n)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("edge")
    backend = Qsd(workdir, size=SIZE, num_queues=4).start()
    srv = Nbdkit(workdir, {"socket": backend.socket, "reconnect-timeout": 30}, stats=True)
    try:
        srv.start()
        srv.backend = backend
        yield srv
    finally:
        srv.cleanup()
        backend.cleanup()


@pytest.fixture
def h(server):
    handle = server.connect(strict=False)
    assert handle.get_strict_mode() == 0
    yield handle
    close_handle(handle)
    assert server.running, f"nbdkit died:\n{server.log_text()[-3000:]}"


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def try_cmd(f):
    """Run a libnbd call: (None, result) on success, (errno name, None) on a server error."""
    try:
        return None, f()
    except nbd.Error as e:
        return e.errno, None


def assert_serving(server, base: int = 150 * MiB) -> None:
    """A fresh connection can write and read back."""
    h2 = server.connect()
    try:
        data = rand(64 * 1024, base)
        h2.pwrite(data, base)
        assert h2.pread(len(data), base) == data
    finally:
        close_handle(h2)


# --- zero-length requests ---------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 4096, SIZE - 512, SIZE])
def test_zero_length_requests(server, h, offset):
    around = min(max(offset - 4096, 0), SIZE - 12288)   # 12 KiB around the offset
    before = rand(12288, offset)
    h.pwrite(before, around)
    outcomes = {
        "read": try_cmd(lambda: h.pread(0, offset)),
        "write": try_cmd(lambda: h.pwrite(b"", offset)),
        "write-fua": try_cmd(lambda: h.pwrite(b"", offset, FUA)),
        "trim": try_cmd(lambda: h.trim(0, offset)),
        "zero": try_cmd(lambda: h.zero(0, offset)),
        "zero-fast": try_cmd(lambda: h.zero(0, offset, FAST_ZERO)),
    }
    for what, (err, result) in outcomes.items():
        # Success (reading nothing) or a clean "invalid" answer; never EIO, never a crash.
        assert err in (None, "EINVAL", "ENOSPC"), (what, err)
        if what == "read" and err is None:
            assert result == b""
    assert h.pread(len(before), around) == before, "a zero-length request changed data"
    assert_serving(server)


# --- past the end -----------------------------------------------------------------------------

@pytest.mark.parametrize("offset,length", [
    (SIZE - 512, 1024), (SIZE - 4096, 8192), (SIZE, 512), (SIZE + 512, 512),
    (2 ** 62, 512), (2 ** 63 - 512, 512), (SIZE - 512, 64 * MiB)])
def test_requests_past_the_end(server, h, offset, length):
    tail = rand(8192, offset % 9973)
    h.pwrite(tail, SIZE - 8192)
    out = {
        "read": try_cmd(lambda: h.pread(length, offset)),
        "write": try_cmd(lambda: h.pwrite(b"\xee" * length, offset)),
        "write-fua": try_cmd(lambda: h.pwrite(b"\xee" * length, offset, FUA)),
        "trim": try_cmd(lambda: h.trim(length, offset)),
        "zero": try_cmd(lambda: h.zero(length, offset)),
        "zero-fast-nohole": try_cmd(lambda: h.zero(length, offset, FAST_ZERO | NO_HOLE)),
    }
    for what, (err, _) in out.items():
        assert err in ("EINVAL", "ENOSPC", "EIO", "EOVERFLOW", "ERANGE"), (what, err)
    # Nothing of the in-range part was written.
    assert h.pread(8192, SIZE - 8192) == tail, "a request past the end changed the last bytes"
    assert_serving(server)


# --- the largest requests ---------------------------------------------------------------------

def test_largest_requests(server, h):
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB
    big = rand(64 * MiB, 64)
    base = 8 * MiB + 4096           # not aligned to 1 MiB: splits cross bounce-buffer edges
    guard = rand(4096, 65)
    h.pwrite(guard, base - 4096)
    h.pwrite(guard, base + len(big))
    h.pwrite(big, base)
    assert h.pread(64 * MiB, base) == big
    h.pwrite(big[::-1], base, FUA)
    assert h.pread(64 * MiB, base) == big[::-1]
    assert h.pread(4096, base - 4096) == guard and h.pread(4096, base + len(big)) == guard
    # libnbd itself refuses a payload over 64 MiB, even with strict mode off.
    err, _ = try_cmd(lambda: h.pread(64 * MiB + 512, 0))
    assert err in ("ERANGE", "EINVAL"), err
    # Zero and trim are not bounded by the payload limit: 100 MiB each, more than the device's
    # max_write_zeroes / max_discard (16 MiB), so split, and the neighbours stay intact.
    zbase = 20 * MiB
    h.pwrite(guard, zbase - 4096)
    h.pwrite(guard, zbase + 100 * MiB)
    h.zero(100 * MiB, zbase)
    for off in range(0, 100 * MiB, 32 * MiB):
        assert h.pread(min(32 * MiB, 100 * MiB - off), zbase + off).count(0) == \
            min(32 * MiB, 100 * MiB - off), f"zero left data at {zbase + off}"
    h.pwrite(b"\x5a" * 4 * MiB, zbase)
    h.pwrite(b"\x5b" * 4 * MiB, zbase + 96 * MiB)
    h.trim(100 * MiB, zbase)
    # discard=unmap down to the image file: a trimmed range reads as zeroes, end to end
    for off in (0, 96 * MiB):
        got = h.pread(4 * MiB, zbase + off)
        assert got.count(0) == len(got), f"trimmed data still reads back at {zbase + off}"
    assert h.pread(4096, zbase - 4096) == guard and h.pread(4096, zbase + 100 * MiB) == guard
    assert_serving(server)


# --- unaligned offsets and lengths ------------------------------------------------------------

WINDOW = 64 * 1024


@pytest.mark.parametrize("op", ["read", "write", "write-fua", "zero", "trim"])
@pytest.mark.parametrize("delta,length", [(1, 512), (511, 1), (513, 1000), (0, 100),
                                          (512, 4097), (4095, 8192), (0, 511), (512, 1024)])
def test_unaligned_requests(server, h, op, delta, length):
    """README: requests not aligned to the logical block size (512 here) fail with EINVAL and
    change nothing; aligned ones (the last case) do exactly what they say."""
    base = 40 * MiB
    before = rand(WINDOW, base)
    h.pwrite(before, base)
    off = base + 8192 + delta
    rel = off - base
    aligned = off % 512 == 0 and length % 512 == 0
    payload = rand(length, delta * 7 + length)
    if op == "read":
        err, got = try_cmd(lambda: h.pread(length, off))
    elif op.startswith("write"):
        err, _ = try_cmd(lambda: h.pwrite(payload, off, FUA if op == "write-fua" else 0))
    elif op == "zero":
        err, _ = try_cmd(lambda: h.zero(length, off))
    else:
        err, _ = try_cmd(lambda: h.trim(length, off))
    if not aligned:
        assert err == "EINVAL", f"{op} of {length} at +{delta}: {err}"
    else:
        assert err is None, f"aligned {op} of {length} at +{delta} failed: {err}"
    after = h.pread(WINDOW, base)
    if err is not None or op == "read":
        if op == "read" and err is None:
            assert got == before[rel:rel + length]
        assert after == before, f"{op} failed with {err} but changed data"
        return
    expect = bytearray(before)
    if op.startswith("write"):
        expect[rel:rel + length] = payload
    else:   # zero and trim (discard=unmap down to the file: trimmed data reads as zeroes)
        expect[rel:rel + length] = bytes(length)
    assert after == bytes(expect), f"{op} of {length} at +{delta}: wrong data"


# --- flags ------------------------------------------------------------------------------------

def _flag_name(flags: int) -> str:
    names = [n for f, n in ((FUA, "FUA"), (NO_HOLE, "NO_HOLE"), (FAST_ZERO, "FAST_ZERO"))
             if flags & f]
    return "|".join(names) or "0"


@pytest.mark.parametrize("flags", FLAG_COMBOS, ids=_flag_name)
@pytest.mark.parametrize("op", ["write", "zero", "trim", "flush"])
def test_flag_combinations(server, h, op, flags):
    # Valid by the NBD protocol: FUA on any command; NO_HOLE and FAST_ZERO on WRITE_ZEROES only.
    valid = op == "zero" or not flags & (NO_HOLE | FAST_ZERO)
    base = (60 * MiB + FLAG_COMBOS.index(flags) * MiB
            + ["write", "zero", "trim", "flush"].index(op) * 8 * MiB)
    before = rand(256 * 1024, base)
    h.pwrite(before, base)
    rel, length = 64 * 1024, 128 * 1024
    payload = rand(length, flags + 1000)
    if op == "write":
        err, _ = try_cmd(lambda: h.pwrite(payload, base + rel, flags))
    elif op == "zero":
        err, _ = try_cmd(lambda: h.zero(length, base + rel, flags))
    elif op == "trim":
        err, _ = try_cmd(lambda: h.trim(length, base + rel, flags))
    else:
        err, _ = try_cmd(lambda: h.flush(flags))
    if valid:
        assert err is None, f"{op} with flags {_flag_name(flags)} failed: {err}"
    else:
        assert err in (None, "EINVAL"), err
    after = h.pread(len(before), base)
    expect = bytearray(before)
    if err is None:
        if op == "write":
            expect[rel:rel + length] = payload
        elif op == "zero":
            expect[rel:rel + length] = bytes(length)
        elif op == "trim":   # discard=unmap down to the image file: reads as zeroes
            expect[rel:rel + length] = bytes(length)
    assert after == bytes(expect), f"{op} with {_flag_name(flags)}: wrong data"


# --- disconnect with requests in flight -------------------------------------------------------

def _wait_idle(server, since: float, timeout: float = 15.0) -> dict | None:
    """Stats written at least 1.2 s after ``since`` showing nothing in flight, or the last seen."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline and server.running:
        try:
            fresh = os.stat(server.stats_path).st_mtime > since + 1.2
        except FileNotFoundError:
            fresh = False
        st = server.stats()
        if fresh and st and st["totals"]["in_flight"] == 0 and st["bounce_buffers_in_use"] == 0:
            return st
        time.sleep(0.2)
    return st


def _flood(h, n: int, seed: int) -> list:
    """Issue ``n`` big aio requests without waiting; returns their buffers (keep them alive)."""
    rng = random.Random(seed)
    bufs = []
    for i in range(n):
        off = rng.randrange(0, 100 * MiB // 4096) * 4096
        kind = i % 5
        if kind in (0, 1):
            b = nbd.Buffer(4 * MiB)
            h.aio_pread(b, off)
        elif kind == 2:
            b = nbd.Buffer.from_bytearray(rand(2 * MiB, i))
            h.aio_pwrite(b, off, flags=FUA if i % 2 else 0)
        elif kind == 3:
            b = None
            h.aio_zero(8 * MiB, off)
        else:
            b = None
            h.aio_flush()
        bufs.append(b)
    return bufs


# nbdkit 1.32 (Debian 12) itself aborts when a client drops its socket while worker threads still
# owe it replies (any plugin, e.g. `nbdkit memory`, with the default parallel workers; fine
# with -t 1); nbdkit 1.42 (Debian 13) does not.  Only nbdkit dying of that exact assertion, on
# nbdkit older than 1.34, after an abrupt disconnect, is an xfail (imperative, decided after the
# run): every case where nbdkit survived (all of them on 1.42, most of them on 1.32) goes through
# all the leak checks, and on 1.42 such a death is a plain failure.
NBDKIT_DISCONNECT_BUG = "raw_send_socket: Assertion `sock >= 0' failed"
NBDKIT_FIXED = (1, 34)


def _nbdkit_version() -> tuple[int, int]:
    import re
    import shutil
    import subprocess
    nbdkit = shutil.which("nbdkit") or "/usr/bin/nbdkit"
    out = subprocess.run([nbdkit, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    assert m, f"cannot read the version of {nbdkit}: {out!r}"
    return int(m.group(1)), int(m.group(2))


@pytest.fixture
def own_server(qsd_factory, nbdkit_factory, how):
    """A server of its own (a crash must not take the module's server with it); "-t1"
    variants run nbdkit with one worker thread per connection, which avoids nbdkit's bug."""
    backend = qsd_factory(size=SIZE, num_queues=4)
    return nbdkit_factory({"socket": backend.socket, "reconnect-timeout": 30}, stats=True,
                          nbdkit_args=["-t", "1"] if how.endswith("-t1") else [])


@pytest.mark.parametrize("how", ["shutdown", "shutdown-abandon", "three-shutdown",
                                 "abrupt-close", "three-abrupt", "three-abrupt-t1"])
def test_disconnect_with_requests_in_flight(own_server, how):
    server = own_server
    handles = [server.connect(strict=False) for _ in range(3 if how.startswith("three") else 1)]
    keep = []
    for i, hh in enumerate(handles):
        keep.append(_flood(hh, 64, i))
    # Let the requests reach the server: disconnect once some have been answered.
    deadline = time.monotonic() + 10
    while any(hh.aio_in_flight() > 60 for hh in handles) and time.monotonic() < deadline:
        for hh in handles:
            hh.poll(10)
    for hh in handles:
        assert 0 < hh.aio_in_flight() <= 60, "nothing in flight: the test would prove nothing"
    if how.endswith("shutdown"):
        for hh in handles:
            hh.shutdown()
    elif how == "shutdown-abandon":
        handles[0].shutdown(nbd.SHUTDOWN_ABANDON_PENDING)
    # Otherwise drop the handles: libnbd closes the socket at once, replies still owed.
    handles.clear()
    keep.clear()
    t_disc = time.time()
    st = _wait_idle(server, t_disc)
    if (not server.running and "abrupt" in how and not how.endswith("-t1")
            and NBDKIT_DISCONNECT_BUG in server.log_text()  # a failed assert(): abort()
            and _nbdkit_version() < NBDKIT_FIXED):
        pytest.xfail("nbdkit 1.32 aborted on the abrupt disconnect (its own bug: "
                     f"{NBDKIT_DISCONNECT_BUG}); not a vblk leak")
    assert server.running, f"nbdkit died:\n{server.log_text()[-3000:]}"
    # The checks below must judge the stats of after the disconnect, not older ones.
    assert st is not None, "no stats written"
    assert os.stat(server.stats_path).st_mtime > t_disc + 1.2, \
        f"stats not rewritten since the disconnect: {st}"
    assert st["totals"]["in_flight"] == 0, f"requests leaked in flight: {st}"
    assert st["bounce_buffers_in_use"] == 0, f"bounce buffers leaked: {st}"
    assert st["state"] == "connected", st
    assert st["totals"]["requests"] > 0, "the device saw no request"
    assert st["bounce_buffers_high_water"] <= 64
    assert_serving(server, 151 * MiB)
