"""End-to-end tests of plugin/plugin.py under a real nbdkit, driven by real NBD clients
(libnbd's Python binding in-process, qemu-img, nbdcopy, fio's nbd engine), against a real
qemu-storage-daemon (conftest's ``qsd_factory``, or the plugin's own daemon with image=).

Every test checks data against an independent model or the image file itself, and teardown
checks that no qemu-storage-daemon started for the test survives.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import need_module, need_program
from leftovers import kill_procs, qsd_processes, wait_no_qsd
from vblk_tools.harness import Nbdkit, chain_without_discard
from vblk_tools.patterns import assert_same_bytes

nbd = need_module("nbd", "python3-libnbd")

MiB = 1 << 20
SECTOR = 512
MAX_BLOCK = 64 * MiB


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """After each test (and every other fixture's teardown): no nbdkit or qemu-storage-daemon
    started by this process survives.  Survivors are killed by PID and fail the test."""
    yield
    me = psutil.Process()
    left = []
    for p in me.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.name() in ("nbdkit", "qemu-storage-daemon",
                                                                  "qemu-storage-da"):
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    kill_procs(left)
    assert not left, f"processes left behind: {left}"


@pytest.fixture
def workdir(tmp_path):
    """A directory for the images and files the keys name, apart from the harness's daemons
    (a daemon whose command line mentions it is one the plugin started)."""
    d = tmp_path / "keys"
    d.mkdir()
    return str(d)


def stop_ok(kit: Nbdkit) -> None:
    """Stop nbdkit with SIGTERM and require a clean exit without a Python traceback."""
    rc = kit.stop().status
    err = kit.log_text()
    assert rc == 0, f"nbdkit exited with status {rc}:\n{err}"
    assert "Traceback" not in err, err


# --- size and flags ------------------------------------------------------------------------

def test_size_and_flags_as_advertised(qsd_factory, nbdkit_factory):
    size = 48 * MiB + 3 * SECTOR  # not a round number: capacity must be exact
    qsd = qsd_factory(num_queues=4, size=size)
    kit = nbdkit_factory({"socket": qsd.socket})
    h = kit.connect()
    try:
        assert h.get_size() == size
        assert h.is_read_only() is False
        assert h.can_multi_conn() is True
        assert h.can_fua() is True
        assert h.can_trim() is True
        assert h.can_zero() is True
        assert h.can_fast_zero() is True
        assert h.can_flush() is True
        assert h.is_rotational() is False
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
        preferred = h.get_block_size(nbd.SIZE_PREFERRED)
        assert preferred >= 512 and preferred & (preferred - 1) == 0
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == MAX_BLOCK
        # The last sector is addressable, one past it is not.
        h.pwrite(b"\xee" * SECTOR, size - SECTOR)
        assert h.pread(SECTOR, size - SECTOR) == b"\xee" * SECTOR
        h.set_strict_mode(0)
        with pytest.raises(nbd.Error):
            h.pread(SECTOR, size)
    finally:
        h.shutdown()
    stop_ok(kit)


def _assert_write_refused(h, what, fn):
    with pytest.raises(nbd.Error) as ei:
        fn()
    assert ei.value.errnum in (errno.EPERM, errno.EROFS), f"{what}: {ei.value}"


def _check_read_only(kit, original: bytes):
    h = kit.connect()
    try:
        assert h.is_read_only() is True
        assert h.pread(64 * 1024, 0) == original[:64 * 1024]
        # libnbd itself refuses a write to a read-only export with EPERM...
        _assert_write_refused(h, "pwrite (strict)", lambda: h.pwrite(b"x" * 4096, 0))
    finally:
        h.shutdown()
    # ...and with strict mode off the requests reach nbdkit, which must refuse them too.
    h = kit.connect(strict=False)
    try:
        _assert_write_refused(h, "pwrite", lambda: h.pwrite(b"x" * 4096, 0))
        _assert_write_refused(h, "pwrite+fua",
                              lambda: h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA))
        _assert_write_refused(h, "zero", lambda: h.zero(4096, 0))
        _assert_write_refused(h, "trim", lambda: h.trim(4096, 0))
        h.flush()  # allowed and harmless
        assert h.pread(64 * 1024, 0) == original[:64 * 1024]
    finally:
        h.shutdown()


def test_read_only_nbdkit_r(qsd_factory, nbdkit_factory):
    original = random.Random(1).randbytes(1 * MiB)
    qsd = qsd_factory(num_queues=2, size=8 * MiB, content=original)
    kit = nbdkit_factory({"socket": qsd.socket}, readonly=True)
    _check_read_only(kit, original)
    stop_ok(kit)
    assert_same_bytes(qsd.read_image(0, len(original)), original, "image after -r")


def test_read_only_daemon_writable_off(qsd_factory, nbdkit_factory):
    original = random.Random(2).randbytes(1 * MiB)
    qsd = qsd_factory(num_queues=2, size=8 * MiB, content=original, writable=False)
    kit = nbdkit_factory({"socket": qsd.socket})  # no -r: the device itself is read-only
    _check_read_only(kit, original)
    stop_ok(kit)
    assert_same_bytes(qsd.read_image(0, len(original)), original, "image of writable=off")


# --- random mixed I/O against a model ------------------------------------------------------

def _random_length(rng: random.Random, size: int) -> int:
    r = rng.random()
    if r < 0.6:
        n = rng.randint(1, 128) * SECTOR                   # 512 B .. 64 KiB
    elif r < 0.93:
        n = rng.randint(128, 4096) * SECTOR                # 64 KiB .. 2 MiB
    else:
        n = rng.randint(4096, 65536) * SECTOR              # 2 MiB .. 32 MiB
    return min(n, size)


def _random_extent(rng: random.Random, size: int, length: int | None = None) -> tuple[int, int]:
    n = length if length is not None else _random_length(rng, size)
    off = rng.randrange(0, (size - n) // SECTOR + 1) * SECTOR
    return off, n


def test_random_mixed_io_matches_model_and_image(qsd_factory, nbdkit_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    size = 80 * MiB
    model = bytearray(rng.randbytes(size))
    qsd = qsd_factory(num_queues=4, size=size, content=bytes(model))
    kit = nbdkit_factory({"socket": qsd.socket})
    h = kit.connect()
    ctx = f"seed={seed}"
    counts: dict[str, int] = {}

    def check_read(off, n, what):
        got = h.pread(n, off)
        assert_same_bytes(got, model[off:off + n], f"{ctx}: {what} read {n}@{off}", off)

    # Fixed extremes first, then a random mix.
    script = [("write", 0, SECTOR), ("write", size - SECTOR, SECTOR),
              ("write", 3 * MiB + SECTOR, 32 * MiB), ("read", 3 * MiB + SECTOR, 32 * MiB),
              ("read", 0, SECTOR), ("read", size - SECTOR, SECTOR)]
    ops = ["write"] * 30 + ["read"] * 30 + ["zero"] * 10 + ["trim"] * 8 + ["flush"] * 4 + \
        ["write_fua"] * 8
    for _ in range(150):
        op = rng.choice(ops)
        off, n = _random_extent(rng, size)
        script.append((op, off, n))

    try:
        for i, (op, off, n) in enumerate(script):
            counts[op] = counts.get(op, 0) + 1
            what = f"op {i} {op}"
            if op in ("write", "write_fua"):
                data = rng.randbytes(n)
                h.pwrite(data, off, nbd.CMD_FLAG_FUA if op == "write_fua" else 0)
                model[off:off + n] = data
                if rng.random() < 0.3:
                    check_read(off, n, what)
            elif op == "read":
                check_read(off, n, what)
            elif op == "flush":
                h.flush()
            elif op == "zero":
                flags = 0
                # NBD's "may trim" is the absence of NO_HOLE.
                for f in (nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FAST_ZERO):
                    if rng.random() < 0.5:
                        flags |= f
                h.zero(n, off, flags)
                model[off:off + n] = bytes(n)
                check_read(off, n, f"{what} flags={flags:#x}")
            elif op == "trim":
                h.trim(n, off, nbd.CMD_FLAG_FUA if rng.random() < 0.5 else 0)
                # discard=unmap on every node down to the image file: the daemon punches a
                # hole (the kernel zeroes partial blocks), so a trimmed range reads as zeroes
                model[off:off + n] = bytes(n)
                check_read(off, n, f"{what} (trimmed)")
        # Whole device through NBD, then the image file after nbdkit has exited.
        for pos in range(0, size, 16 * MiB):
            check_read(pos, min(16 * MiB, size - pos), "final")
    finally:
        h.shutdown()
    assert counts.get("zero") and counts.get("trim") and counts.get("write_fua"), counts
    stop_ok(kit)
    assert_same_bytes(qsd.read_image(), model, f"{ctx}: image file after nbdkit exit")


def test_zero_flags_zero_exactly_their_range(qsd_factory, nbdkit_factory):
    """Each zero flag combination zeroes exactly its range, also in the image file."""
    size = 24 * MiB
    original = random.Random(3).randbytes(size)
    qsd = qsd_factory(num_queues=1, size=size, content=original)
    kit = nbdkit_factory({"socket": qsd.socket})
    h = kit.connect()
    model = bytearray(original)
    # (no NO_HOLE = the server may trim)
    combos = [0, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_FAST_ZERO,
              nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE,
              nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO]
    off = SECTOR
    try:
        for i, flags in enumerate(combos):
            n = (i + 1) * 64 * 1024 + SECTOR
            h.zero(n, off, flags)
            model[off:off + n] = bytes(n)
            off += n + 7 * SECTOR  # leave untouched data between ranges
        # a zero larger than the device's max_write_zeroes (32768 sectors = 16 MiB) is split
        big = 4 * MiB - 4096
        h.zero(size - big, big)
        model[big:] = bytes(size - big)
        h.flush()
        assert_same_bytes(h.pread(size, 0), model, "after zeroes")
    finally:
        h.shutdown()
    stop_ok(kit)
    assert_same_bytes(qsd.read_image(), model, "image after zeroes")


# --- several connections, many requests in flight -------------------------------------------

def _aio_run(h, jobs, depth):
    """Run ``jobs`` (callables h -> cookie) with up to ``depth`` in flight on ``h``; each job's
    completion is checked with aio_command_completed (raises nbd.Error on failure)."""
    pending: set[int] = set()
    it = iter(jobs)
    exhausted = False
    max_seen = 0
    while True:
        while not exhausted and len(pending) < depth:
            job = next(it, None)
            if job is None:
                exhausted = True
                break
            pending.add(job(h))
        max_seen = max(max_seen, h.aio_in_flight())
        if not pending:
            return max_seen
        h.poll(-1)
        for cookie in list(pending):
            if h.aio_command_completed(cookie):
                pending.discard(cookie)


# nbdkit's default thread count (as scripts/serve runs it), and -t 4
THREADS = [pytest.param((), id="default-threads"), pytest.param(("-t", "4"), id="t4")]


@pytest.mark.parametrize("threads", THREADS)
def test_multi_conn_parallel_aio_and_stats(qsd_factory, nbdkit_factory, workdir, threads):
    nconn, region, depth = 4, 16 * MiB, 16
    size = nconn * region
    seed = int.from_bytes(os.urandom(4), "little")
    qsd = qsd_factory(num_queues=4, size=size)
    stats = os.path.join(workdir, "stats.json")
    kit = nbdkit_factory({"socket": qsd.socket, "stats": stats}, nbdkit_args=threads)
    handles = [kit.connect() for _ in range(nconn)]
    model = bytearray(size)
    errors: list[BaseException] = []
    depths = [0] * nconn
    transferred = [0] * nconn

    def worker(i):
        try:
            rng = random.Random(seed + i)
            h = handles[i]
            base = i * region
            # Cover the region with chunks of 4 KiB .. 256 KiB, written in random order.
            chunks, pos = [], 0
            while pos < region:
                n = min(rng.randint(1, 64) * 4096, region - pos)
                chunks.append((base + pos, n))
                pos += n
            rng.shuffle(chunks)
            bufs = {}
            for off, n in chunks:
                data = rng.randbytes(n)
                model[off:off + n] = data
                bufs[off] = nbd.Buffer.from_bytearray(bytearray(data))
            d1 = _aio_run(h, (lambda h, off=off: h.aio_pwrite(bufs[off], off)
                              for off, _ in chunks), depth)
            rng.shuffle(chunks)
            rbufs = {off: nbd.Buffer(n) for off, n in chunks}
            d2 = _aio_run(h, (lambda h, off=off: h.aio_pread(rbufs[off], off)
                              for off, _ in chunks), depth)
            for off, n in chunks:
                assert_same_bytes(rbufs[off].to_bytearray(), model[off:off + n],
                                  f"seed={seed} conn {i} read {n}@{off}", off)
            depths[i] = max(d1, d2)
            transferred[i] = 2 * region
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(nconn)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "aio workers hung"
    if errors:
        raise errors[0]
    assert min(depths) > 1, f"requests were not in flight concurrently: {depths}"
    # multi-conn: one connection sees every connection's completed writes; a flush on one
    # covers them all.
    handles[0].flush()
    assert_same_bytes(handles[3].pread(size, 0), model, f"seed={seed} whole device via conn 3")
    for h in handles:
        h.shutdown()
    stop_ok(kit)
    assert_same_bytes(qsd.read_image(), model, f"seed={seed} image file")

    with open(stats) as f:
        st = json.load(f)
    queues = st["queues"]
    assert len(queues) == 4, st
    assert [q["index"] for q in queues] == [0, 1, 2, 3]
    busy = [q for q in queues if q["requests"] > 0]
    assert len(busy) > 1, f"only one virtqueue was used: {queues}"
    totals = st["totals"]
    assert totals["errors"] == 0, st
    assert totals["requests"] == sum(q["requests"] for q in queues)
    # Data bytes of completed requests: every region written and read once, then the whole
    # device read once more (flushes carry none).
    assert totals["bytes"] == sum(transferred) + size, st
    assert totals["max_depth"] > 1, f"the device never had two requests in flight: {st}"


# --- other clients: qemu-img, nbdcopy, fio ---------------------------------------------------

#: client programs these tests run, and the Debian package of each
CLIENTS = {"qemu-img": "qemu-utils", "nbdcopy": "libnbd-bin", "nbdinfo": "libnbd-bin",
           "fio": "fio"}


def _run(cmd, timeout=120, cwd=None):
    """Run a client program (missing: the test fails naming its package)."""
    program = need_program(cmd[0], CLIENTS[cmd[0]])
    r = subprocess.run([program, *cmd[1:]], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout, cwd=cwd)
    return r.returncode, r.stdout + r.stderr


def _mixed_content(rng: random.Random, size: int) -> bytes:
    """Random data with zero runs (so copy tools take their sparse/zero paths)."""
    out = bytearray(rng.randbytes(size))
    for _ in range(8):
        off = rng.randrange(0, size // MiB) * MiB
        n = rng.randint(1, 3) * MiB
        out[off:off + n] = bytes(len(out[off:off + n]))
    return bytes(out)


def test_qemu_img_compare_and_nbdcopy_in_and_out(qsd_factory, nbdkit_factory, workdir):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    size = 32 * MiB
    qsd = qsd_factory(num_queues=4, size=size, content=_mixed_content(rng, size))
    kit = nbdkit_factory({"socket": qsd.socket}, nbdkit_args=("-t", "4"))
    img = str(qsd.image)

    # qemu-img compare, export vs. the image file the daemon serves (-U: the daemon holds the
    # image's locks).  First prove the comparison can fail: a copy with one sector changed.
    altered = os.path.join(workdir, "altered.img")
    shutil.copyfile(img, altered)
    with open(altered, "r+b") as f:
        f.seek(size // 2 + 3 * SECTOR)
        f.write(b"\x5a" * SECTOR)
    rc, out = _run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", kit.uri, altered])
    assert rc == 1, f"qemu-img compare did not notice a changed sector (rc {rc}): {out}"
    rc, out = _run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", kit.uri, img])
    assert rc == 0, f"qemu-img compare export vs image: rc {rc}: {out}"

    # nbdcopy out: export -> file.
    out_img = os.path.join(workdir, "out.img")
    rc, out = _run(["nbdcopy", kit.uri, out_img])
    assert rc == 0, out
    assert_same_bytes(Path(out_img).read_bytes(), Path(img).read_bytes(), "nbdcopy out")

    # nbdcopy in: new content file -> export (multi-conn, zeroes for the zero runs).
    src = os.path.join(workdir, "src.img")
    src_data = _mixed_content(rng, size)
    with open(src, "wb") as f:
        f.write(src_data)
    rc, out = _run(["nbdcopy", "--flush", src, kit.uri])
    assert rc == 0, out
    rc, out = _run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", kit.uri, src])
    assert rc == 0, f"qemu-img compare export vs nbdcopy source: rc {rc}: {out}"
    stop_ok(kit)
    assert_same_bytes(qsd.read_image(), src_data, "image after nbdcopy in")


@pytest.mark.parametrize("threads", THREADS)
def test_fio_nbd_engine_write_then_verify_every_byte(qsd_factory, nbdkit_factory, workdir, threads):
    """fio's nbd engine, two jobs (two connections) each writing its own 16 MiB once in random
    order with random block sizes, then reading all of it back and checking every block's
    crc32c.  Bounded by size, not by time: the verify phase always runs, and the bytes it
    verified must equal the bytes written."""
    qsd = qsd_factory(num_queues=4, size=48 * MiB)
    stats = os.path.join(workdir, "fio-stats.json")
    kit = nbdkit_factory({"socket": qsd.socket, "stats": stats}, nbdkit_args=threads)
    out_json = os.path.join(workdir, "fio.json")
    job = 16 * MiB
    cmd = ["fio", "--ioengine=nbd", f"--uri={kit.uri}", "--rw=randwrite", "--bsrange=4k-64k",
           "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
           "--verify_state_save=0", f"--output={out_json}", "--output-format=json"]
    for j in range(2):
        cmd += [f"--name=vblk{j}", f"--offset={MiB + j * (job + MiB)}", f"--size={job}"]
    rc, out = _run(cmd, timeout=120, cwd=workdir)
    assert rc == 0, f"fio failed (rc {rc}): {out}\n{kit.log_text()}"
    with open(out_json) as f:
        text = f.read()
    report = json.loads(text[text.index("{"):])
    jobs = report["jobs"]
    assert len(jobs) == 2, jobs
    for j in jobs:
        assert j["error"] == 0, j
        written, verified = j["write"]["io_bytes"], j["read"]["io_bytes"]
        assert written == job, f"{j['jobname']} wrote {written} bytes, not {job}"
        assert verified == written, f"{j['jobname']} verified {verified} of {written} bytes"
    stop_ok(kit)
    with open(stats) as f:
        totals = json.load(f)["totals"]
    # the device carried every byte both ways, and failed nothing
    assert totals["bytes"] >= 2 * 2 * job and totals["errors"] == 0, totals


# --- image= mode: the plugin's own qemu-storage-daemon ---------------------------------------

def _own_daemons(kit: Nbdkit, image: str, timeout: float = 10.0) -> list[psutil.Process]:
    """nbdkit's live qemu-storage-daemon children serving ``image`` (polled for: a daemon
    being restarted is briefly missing)."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for p in psutil.Process(kit.pid).children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and any(image in a for a in p.cmdline()):
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _daemon_socket_dir(proc: psutil.Process) -> str | None:
    for arg in proc.cmdline():
        for part in arg.split(","):
            if part.startswith("addr.path="):
                return os.path.dirname(part[len("addr.path="):])
    return None


@pytest.fixture
def image_mode(workdir, nbdkit_factory):
    """``image_mode(size, content)`` -> (kit, image path, model, daemon); at teardown kills
    (by PID) and reports any qemu-storage-daemon still serving the image."""
    images: list[str] = []

    def start(size, content=b"", **params):
        img = os.path.join(workdir, f"disk{len(images)}.img")
        with open(img, "wb") as f:
            f.write(content)
            f.truncate(size)
        images.append(img)
        kit = nbdkit_factory({"image": img, **params})
        daemons = _own_daemons(kit, img)
        assert len(daemons) == 1, f"image= should start one qemu-storage-daemon: {daemons}"
        missing = chain_without_discard(daemons[0].cmdline())
        assert not missing, f"image= daemon without discard=unmap on {missing}"
        return kit, img, bytearray(content) + bytearray(size - len(content)), daemons[0]

    yield start
    for img in images:
        left = wait_no_qsd(img, timeout=5)   # (SIGTERM from a dying nbdkit takes a moment)
        kill_procs(left)
        assert not left, f"qemu-storage-daemon left behind: {left}"


def _exercise(h, model, rng):
    size = len(model)
    for _ in range(40):
        off, n = _random_extent(rng, size, rng.randint(1, 512) * SECTOR)
        data = rng.randbytes(n)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.2 else 0)
        model[off:off + n] = data
    h.zero(MiB, 2 * MiB)
    model[2 * MiB:3 * MiB] = bytes(MiB)
    h.flush()
    assert_same_bytes(h.pread(size, 0), model, "image= mode read back")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_image_mode_end_to_end_stop(image_mode, sig):
    """SIGTERM, or ^C (SIGINT), to nbdkit: it shuts down through cleanup, which stops the
    private daemon and removes its directory; the image holds what was written."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    size = 16 * MiB
    kit, img, model, daemon = image_mode(size, rng.randbytes(4 * MiB))
    sock_dir = _daemon_socket_dir(daemon)
    assert sock_dir and os.path.isdir(sock_dir)
    h = kit.connect()
    assert h.get_size() == size and not h.is_read_only()
    _exercise(h, model, rng)
    h.shutdown()
    if sig == signal.SIGTERM:
        stop_ok(kit)
    else:
        os.kill(kit.pid, sig)
        rc = kit.proc.wait(15)
        kit.proc = None
        assert rc == 0, f"nbdkit exited with status {rc} on {sig.name}:\n{kit.log_text()}"
    left = wait_no_qsd(img, timeout=5)
    kill_procs(left)
    assert not left, f"qemu-storage-daemon survived nbdkit's {sig.name}: {left}"
    assert not os.path.exists(sock_dir), f"private daemon directory {sock_dir} left behind"
    assert_same_bytes(Path(img).read_bytes(), model, "image file after nbdkit exit")


def test_image_mode_sigkill_leaves_no_daemon(image_mode):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    size = 8 * MiB
    kit, img, model, daemon = image_mode(size)
    sock_dir = _daemon_socket_dir(daemon)
    try:
        h = kit.connect()
        _exercise(h, model, rng)  # flushed: must be in the file whatever happens to nbdkit next
        kit.kill()
        # PR_SET_PDEATHSIG: the kernel sends the daemon SIGTERM when nbdkit dies.
        left = wait_no_qsd(img, timeout=5)
        kill_procs(left)
        assert not left, f"qemu-storage-daemon survived nbdkit's SIGKILL: {left}"
        del h  # the server is gone
        assert_same_bytes(Path(img).read_bytes(), model, "image file after SIGKILL")
    finally:
        if sock_dir:   # nobody can clean up the private directory after a SIGKILL
            shutil.rmtree(sock_dir, ignore_errors=True)


def test_image_mode_restarts_a_daemon_that_died(image_mode, workdir):
    """README: with image=, a private daemon that dies is restarted (reconnect-timeout > 0) and
    the device session reconnects: requests in flight and sent meanwhile succeed."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    size = 16 * MiB
    stats = os.path.join(workdir, "image-stats.json")
    kit, img, model, daemon = image_mode(size, rng.randbytes(2 * MiB), stats=stats)
    h = kit.connect()
    _exercise(h, model, rng)
    first = daemon.pid
    bufs, cookies = [], []
    for i in range(8):
        data = rng.randbytes(256 * 1024)
        off = 4 * MiB + i * 256 * 1024
        model[off:off + len(data)] = data
        bufs.append(nbd.Buffer.from_bytearray(bytearray(data)))
        cookies.append(h.aio_pwrite(bufs[-1], off))
    os.kill(first, signal.SIGKILL)    # the daemon dies with requests in flight
    deadline = time.monotonic() + 60
    while h.aio_in_flight() and time.monotonic() < deadline:
        h.poll(100)
    assert h.aio_in_flight() == 0, "requests hung after the daemon died"
    for cookie in cookies:
        assert h.aio_command_completed(cookie)          # raises for a failed request
    _exercise(h, model, rng)          # and the restarted daemon serves everything
    daemons = _own_daemons(kit, img)
    assert len(daemons) == 1 and daemons[0].pid != first, daemons
    h.shutdown()
    stop_ok(kit)
    assert "restarting it" in kit.log_text(), kit.log_text()[-3000:]
    with open(stats) as f:
        st = json.load(f)
    assert st["reconnects"] == 1 and st["state"] == "connected", st
    assert st["totals"]["errors"] == 0, st
    assert_same_bytes(Path(img).read_bytes(), model, "image file after the restart")


# --- bad configuration ------------------------------------------------------------------------

@pytest.fixture
def bad_config(workdir, qsd_factory, nbdkit_factory):
    """``bad_config(params)`` runs nbdkit with ``params`` (``{DIR}``, ``{DAEMON}`` (a running
    4-queue daemon's socket) and ``{DEAD}`` (a killed daemon's socket file) substituted) and
    returns (its output, whether its socket file was left, the substitution) after requiring a
    quick non-zero exit."""
    daemon: list = []
    dead: list = []

    def subst(p):
        if "{DAEMON}" in p and not daemon:
            daemon.append(qsd_factory(num_queues=4, size=4 * MiB))
        if "{DEAD}" in p and not dead:
            d = qsd_factory(num_queues=1, size=4 * MiB)
            d.kill()
            dead.append(d)
        return (p.replace("{DIR}", workdir)
                .replace("{DAEMON}", daemon[0].socket if daemon else "")
                .replace("{DEAD}", dead[0].socket if dead else ""))

    def run(params):
        kit = nbdkit_factory([subst(p) for p in params], "bad", start=False)
        status, elapsed, _in_time = kit.expect_exit(timeout=20)
        out, socket_left = kit.log_text(), os.path.exists(kit.socket)
        assert status is not None, f"nbdkit kept running with {params}:\n{out}"
        assert status != 0, f"nbdkit accepted {params}:\n{out}"
        assert elapsed < 15, f"nbdkit took {elapsed:.1f}s to refuse {params}"
        return out, socket_left, subst

    return run


def _touch(path, size=0):
    with open(path, "wb") as f:
        f.truncate(size)


BAD_CONFIGS = [
    ("no-device", [], "no device: give socket=PATH"),
    ("no-device-other-keys", ["queue-size=128"], "no device"),
    ("socket-and-image", ["socket={DAEMON}", "image={DIR}/disk.img"],
     "socket= and image= were both given"),
    ("empty-socket", ["socket="], "socket= needs a path"),
    ("missing-socket", ["socket={DIR}/nope.sock"], "nope.sock does not exist"),
    ("not-a-socket", ["socket={DIR}/disk.img"], "is not a unix socket"),
    ("queue-size-0", ["socket={DAEMON}", "queue-size=0"], "queue-size=0 is not a usable"),
    ("queue-size-2", ["socket={DAEMON}", "queue-size=2"], "queue-size=2 is not a usable"),
    ("queue-size-3", ["socket={DAEMON}", "queue-size=3"], "queue-size=3 is not a usable"),
    ("queue-size-12", ["socket={DAEMON}", "queue-size=12"],
     "queue-size=12 is not a usable ring size: use a power of two from 4 to 32768"),
    ("queue-size-65536", ["socket={DAEMON}", "queue-size=65536"],
     "queue-size=65536 is not a usable"),
    ("queue-size-abc", ["socket={DAEMON}", "queue-size=abc"],
     "queue-size='abc' is not a whole number"),
    ("too-many-queues", ["socket={DAEMON}", "num-queues=8"],
     "num-queues=8 is more than the 4 the device at socket="),
    ("socket-not-listening", ["socket={DEAD}"], "socket={DEAD}: "),
    ("unknown-key", ["socket={DAEMON}", "bogus=1"], "unknown parameter 'bogus'"),
    ("image-missing", ["image={DIR}/missing.img"], "missing.img does not exist"),
    ("image-empty", ["image={DIR}/empty.img"], "empty.img is empty"),
    ("image-wrong-format", ["image={DIR}/disk.img", "format=qcow2"], "qemu-storage-daemon"),
    # every key's own errors, through nbdkit
    ("format-unknown", ["image={DIR}/disk.img", "format=vmdk"],
     "format='vmdk' is not supported: use one of raw, qcow2"),
    ("aio-unknown", ["image={DIR}/disk.img", "aio=posix"],
     "aio='posix' is not supported: use one of threads, io_uring, native"),
    ("format-with-socket", ["socket={DAEMON}", "format=raw"],
     "format= only applies with image=, not socket="),
    ("aio-with-socket", ["socket={DAEMON}", "aio=io_uring"],
     "aio= only applies with image=, not socket="),
    ("bounce-buffers-3", ["socket={DAEMON}", "bounce-buffers=3"],
     "bounce-buffers=3 is out of range: use 4 to 4096"),
    ("bounce-buffers-word", ["socket={DAEMON}", "bounce-buffers=many"],
     "bounce-buffers='many' is not a whole number"),
    ("stats-empty", ["socket={DAEMON}", "stats="], "stats= needs a path"),
    ("stats-no-directory", ["socket={DAEMON}", "stats={DIR}/no/such/stats.json"],
     "stats={DIR}/no/such/stats.json: directory {DIR}/no/such does not exist"),
    # sysfs takes no new files, not even root's
    ("stats-unwritable-directory", ["socket={DAEMON}", "stats=/sys/vblk-stats.json"],
     "stats=/sys/vblk-stats.json: nbdkit cannot create files in /sys"),
    ("stats-is-a-directory", ["socket={DAEMON}", "stats={DIR}"],
     "stats={DIR} is a directory: give the path of a file"),
    ("request-timeout-0", ["socket={DAEMON}", "request-timeout=0"],
     "request-timeout=0 is out of range: use more than 0 to 86400 seconds"),
    ("request-timeout-word", ["socket={DAEMON}", "request-timeout=soon"],
     "request-timeout='soon' is not a number of seconds"),
    ("reconnect-timeout-negative", ["socket={DAEMON}", "reconnect-timeout=-1"],
     "reconnect-timeout=-1 is out of range: use 0 (off) to 86400 seconds"),
    ("reconnect-timeout-huge", ["socket={DAEMON}", "reconnect-timeout=86401"],
     "reconnect-timeout=86401 is out of range"),
    ("num-queues-0", ["socket={DAEMON}", "num-queues=0"], "num-queues=0 is out of range"),
    ("repeated-key", ["socket={DAEMON}", "queue-size=128", "queue-size=256"],
     "queue-size= given twice: give it once"),
    ("repeated-device-key", ["socket={DAEMON}", "socket={DAEMON}"],
     "socket= given twice: give it once"),
]


@pytest.mark.parametrize("params,expected", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configuration_fails_at_start(bad_config, workdir, params, expected):
    _touch(os.path.join(workdir, "disk.img"), 4 * MiB)
    _touch(os.path.join(workdir, "empty.img"))
    out, socket_left, subst = bad_config(params)
    expected = subst(expected)
    assert expected in out, f"expected {expected!r} in nbdkit's output:\n{out}"
    if expected != "qemu-storage-daemon":
        # Caught in config/config_complete, before nbdkit listens: one line, not a Python
        # traceback, and no unix socket file left behind.
        assert "Traceback" not in out, out
        said = [line for line in out.splitlines() if line.strip() and not line.startswith("--- ")]
        assert len(said) == 1 and said[0].startswith("nbdkit: python[vblk]: error: "), out
        assert not socket_left, f"nbdkit left its socket behind:\n{out}"
    left = qsd_processes(workdir)
    kill_procs(left)
    assert not left, f"qemu-storage-daemon left behind: {left}"
