"""The back-end (qemu-storage-daemon) crashes under running NBD clients (issue 5).

Each test starts its own daemon and nbdkit+vblk (conftest's factories), kills the daemon
with SIGKILL and checks what the NBD clients see:

- it comes back on the same socket and image: no client error, data equals an in-memory model,
  the image file equals the model byte for byte, stats count the reconnects;
- it never comes back: EIO after reconnect-timeout (bounded), then EIO at once, clean SIGTERM;
- it comes back as a different device: EIO, and nbdkit's stderr says the device changed;
- reconnect-timeout=0: EIO at once.
"""
from __future__ import annotations

import re
import threading
import time

import pytest

from conftest import need_module

nbd = need_module("nbd", "python3-libnbd")

from vblk_tools.harness import Nbdkit  # noqa: E402
from vblk_tools.verify import VerifiedWorker, close_handle, run_aio, run_workers  # noqa: E402

MiB = 1 << 20


def _errors_only(results, allowed=("EIO",)):
    return [r for r in results if r[0] is not None and r[0] not in allowed]


def _shutdown(server: Nbdkit, timeout: float = 8.0) -> tuple:
    """SIGTERM nbdkit (its clients already gone); assert it exits cleanly in time."""
    rc, seconds, in_time = server.stop(timeout)
    assert in_time, (f"nbdkit did not exit within {timeout}s of SIGTERM:\n"
                     f"{server.log_text()[-3000:]}")
    assert rc == 0, f"nbdkit exited with status {rc}:\n{server.log_text()[-3000:]}"
    return rc, seconds


# --- (a) the daemon comes back: clients see nothing -------------------------------------------

KILLS = 3
REGION = 8 * MiB
STRIDE = 16 * MiB    # regions are 8 MiB apart: the gaps must stay zero


def test_kill_and_restart_under_verified_load(qsd_factory, nbdkit_factory, request):
    backend = qsd_factory(size=4 * STRIDE, num_queues=4)
    server = nbdkit_factory({"socket": backend.socket, "reconnect-timeout": 30}, stats=True)
    stop = threading.Event()
    workers = [VerifiedWorker(server.socket, i * STRIDE, REGION, depth=8, seed=100 + i,
                              max_blocks=16, stop=stop, stall_timeout=25, name=f"conn{i}")
               for i in range(4)]
    request.addfinalizer(lambda: [w.close() for w in workers])  # nbdkit waits for its clients
    threads = run_workers(workers)
    progress = []

    def ops() -> int:
        return sum(w.ops for w in workers)

    def wait_ops(what: str, at_least: int, timeout: float = 30.0) -> float:
        """Poll until ops() >= at_least; returns the seconds it took (fails after timeout)."""
        t0 = time.monotonic()
        while ops() < at_least:
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"{what}: not within {timeout:g}s ({ops()} ops; errors "
                            f"{[e for w in workers for e in w.errors][:3]})")
            time.sleep(0.02)
        return time.monotonic() - t0

    def settled(quiet: float = 0.3, timeout: float = 10.0) -> int:
        """The op count once it stopped moving for ``quiet`` seconds (the answers the device
        gave before it died have reached the clients)."""
        last, since, t0 = ops(), time.monotonic(), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.02)
            now = ops()
            if now != last:
                last, since = now, time.monotonic()
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"requests kept completing {timeout:g}s after the back-end died")
        return last

    try:
        wait_ops("the workers got going", 300)
        for k in range(KILLS):
            backend.kill()
            before = settled()
            time.sleep(1.0 + 0.5 * k)                # down 1.0, 1.5, 2.0 s: the fault itself
            during = ops()
            backend.start()
            recovery = wait_ops(f"I/O after restart #{k + 1}", during + 1)
            after = ops()
            progress.append((before, during, after, round(recovery, 2)))
            # enough under way again that the next kill finds requests in flight
            wait_ops(f"I/O after restart #{k + 1}", after + 300)
    finally:
        stop.set()
        for t in threads:
            t.join(40)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    errors = [e for w in workers for e in w.errors]
    assert not errors, f"clients saw {len(errors)} error(s): {errors[:5]}"
    total_ops = ops()
    # While the back-end was down, nothing completed: the requests waited.
    for before, during, _after, _recovery in progress:
        assert during == before, progress
    # Read everything back through nbdkit, then check the image file itself.
    for w in workers:
        w.verify_all()
        w.close()
    errors = [e for w in workers for e in w.errors]
    assert not errors, errors[:5]
    _shutdown(server)
    stats = server.stats()
    assert stats is not None
    assert stats["reconnects"] == KILLS, stats
    assert stats["state"] == "connected" and stats["failure"] is None, stats
    assert stats["totals"]["in_flight"] == 0 and stats["bounce_buffers_in_use"] == 0, stats
    assert stats["totals"]["errors"] == 0, stats
    resubmitted = [int(n) for n in re.findall(r"resubmitting (\d+) request", server.log_text())]
    assert len(resubmitted) == KILLS, server.log_text()[-3000:]
    assert sum(resubmitted) > 0, "no request was in flight at any kill: the test proved little"
    image = backend.read_image()
    for w in workers:
        assert w.image_mismatch(image) is None, w.image_mismatch(image)
    for i in range(4):
        gap = image[i * STRIDE + REGION:(i + 1) * STRIDE]
        assert gap.count(0) == len(gap), f"bytes written outside every region after region {i}"
    verified = sum(w.bytes_verified for w in workers)
    print(f"ops={total_ops} kills={KILLS} resubmitted={sum(resubmitted)} "
          f"bytes_verified={verified} max_latency={max(w.max_latency for w in workers):.2f}s "
          f"(before, during, after, recovery s)={progress}")
    # every request the clients completed reached the device (resubmitted ones count twice)
    assert stats["totals"]["requests"] >= total_ops, stats
    assert verified > 4 * REGION


# --- (b) the daemon never comes back ----------------------------------------------------------

def _mixed_requests(size: int, base: int = 0) -> list:
    data = nbd.Buffer.from_bytearray(b"\xab" * MiB)
    return [
        lambda h: h.aio_pwrite(data, base),
        lambda h: h.aio_pread(nbd.Buffer(MiB), base + MiB),
        lambda h: h.aio_pwrite(data, base + 2 * MiB, flags=nbd.CMD_FLAG_FUA),
        lambda h: h.aio_flush(),
        lambda h: h.aio_zero(MiB, base + 3 * MiB),
        lambda h: h.aio_trim(MiB, base + 4 * MiB),
        lambda h: h.aio_pread(nbd.Buffer(4096), size - 4096),
    ]


def test_backend_never_returns(qsd_factory, nbdkit_factory):
    backend = qsd_factory(size=64 * MiB, num_queues=4)
    server = nbdkit_factory({"socket": backend.socket, "reconnect-timeout": 3}, stats=True)
    h = server.connect()
    size = h.get_size()
    h.pwrite(b"x" * MiB, 0)
    # Requests in flight when the daemon dies, then requests sent while it is gone.
    inflight = [lambda h, i=i: h.aio_pwrite(nbd.Buffer.from_bytearray(b"y" * 4 * MiB), i * 4 * MiB)
                for i in range(8)]
    after = _mixed_requests(size, 32 * MiB)
    results = run_aio(h, inflight + [("do", backend.kill)] + after, timeout=20)
    assert ("HANG", None) not in results, results
    assert not _errors_only(results), results
    first, after_kill = results[:len(inflight)], results[len(inflight):]
    # Those sent after the loss each waited about reconnect-timeout for the back-end, no longer.
    assert all(r[0] == "EIO" for r in after_kill), after_kill
    slowest = max(r[1] for r in results)
    fastest = min(r[1] for r in after_kill)
    assert fastest >= 1.5 and slowest <= 8.0, \
        f"failures after {fastest:.2f}..{slowest:.2f}s of reconnect-timeout=3: {results}"
    # In flight at the kill: completed before it, or failed with the rest (no hang, no other error).
    assert all(r[0] is None or r[1] >= 1.5 for r in first), first
    # Once failed, every request fails at once.
    t0 = time.monotonic()
    later = run_aio(h, _mixed_requests(size), timeout=10)
    assert all(r[0] == "EIO" for r in later), later
    assert time.monotonic() - t0 < 1.0, later
    stats = server.wait_stats(lambda s: s["state"] == "failed", 5)
    assert stats["state"] == "failed" and stats["failure"], stats
    assert stats["totals"]["in_flight"] == 0 and stats["bounce_buffers_in_use"] == 0, stats
    close_handle(h)
    del h
    _, seconds = _shutdown(server, 8.0)
    assert seconds < 5.0
    assert "failed" in server.log_text()


# --- (c) the daemon comes back as another device ----------------------------------------------

def test_backend_returns_as_different_device(qsd_factory, nbdkit_factory, tmp_path):
    backend = qsd_factory(size=64 * MiB, num_queues=4)
    server = nbdkit_factory({"socket": backend.socket, "reconnect-timeout": 30}, stats=True)
    h = server.connect()
    size = h.get_size()
    h.pwrite(b"o" * MiB, 0)
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(32 * MiB)
    backend.kill()
    backend.start(image=other)
    results = run_aio(h, _mixed_requests(size), timeout=25)   # timed from their submission
    assert all(r[0] == "EIO" for r in results), results
    # "Different device" is final: no waiting for the 30 s reconnect-timeout.
    assert max(r[1] for r in results) < 10.0, results
    log = server.log_text()
    assert "device changed" in log, log[-3000:]
    later = run_aio(h, _mixed_requests(size), timeout=10)
    assert all(r[0] == "EIO" for r in later), later
    stats = server.wait_stats(lambda s: s["state"] == "failed", 5)
    assert stats["state"] == "failed" and "changed" in stats["failure"], stats
    assert stats["reconnects"] == 0, stats
    close_handle(h)
    del h
    _shutdown(server)
    # Nothing meant for the old device reached the new one.
    with open(other, "rb") as f:
        data = f.read()
    assert data.count(0) == len(data), "a request reached the different device"


# --- (d) reconnect-timeout=0 -----------------------------------------------------------------

def test_reconnect_timeout_zero_fails_at_once(qsd_factory, nbdkit_factory):
    backend = qsd_factory(size=64 * MiB, num_queues=4)
    server = nbdkit_factory({"socket": backend.socket, "reconnect-timeout": 0}, stats=True)
    h = server.connect()
    size = h.get_size()
    h.pwrite(b"z" * MiB, 0)
    assert h.pread(MiB, 0) == b"z" * MiB
    backend.kill()
    backend.start()     # it is back at once, but reconnect-timeout=0 means: do not try
    results = run_aio(h, _mixed_requests(size), timeout=10)   # timed from their submission
    assert all(r[0] == "EIO" for r in results), results
    assert max(r[1] for r in results) < 1.0, results
    stats = server.wait_stats(lambda s: s["state"] == "failed", 5)
    assert stats["state"] == "failed" and stats["reconnects"] == 0, stats
    close_handle(h)
    del h
    _shutdown(server)
