"""BlockDevice against a hostile vhost-user-blk back-end (tests/fake_vhost_user.py).

For every fault the fake can inject, constructing the device or the I/O that follows must give a
clear error of the right class (ConnectError / ProtocolError / ControlTimeout / TransportError /
DeviceError / RequestError, with a message that says what is wrong) or EIO/EPROTO for the
requests it hits: no crash, no hang past the configured timeouts, no bytes of one request ever
handed to another, and after a device-side failure every later request fails fast with EIO and
close() returns promptly.  A healthy fake serves verified I/O (it is faithful), and a fake that
vanishes mid-workload and is replaced by a fresh one on the same socket gets the in-flight
requests resubmitted with no error and correct data.

Each test checks that its fault was really injected; the number of faults injected per kind is
printed at the end of the module.
"""
from __future__ import annotations

import collections
import errno
import itertools
import os
import re
import signal
import threading
import time
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_util import open_device
from fake_blk import (
    F_EVENT_IDX,
    F_PROTOCOL_FEATURES,
    F_SIZE_MAX,
    F_VERSION_1,
    INJECTED,
    QSD_FEATURES,
)
from fake_vhost_user import (
    P_CONFIG,
    P_REPLY_ACK,
    QSD_PROTOCOL_FEATURES,
    FakeVhostUserBlk,
    Req,
    wait_for,
)
from vblk_core import (
    BlockDevice,
    ConfigError,
    ConnectError,
    ControlTimeout,
    DeviceError,
    DeviceState,
    ProtocolError,
    RequestError,
    TransportError,
    VblkError,
)
from vblk_tools.patterns import pattern  # ASCII only: never PREFILL

CONTROL_TIMEOUT = 1.0
REQUEST_TIMEOUT = 1.0
SLACK = 5.0                 # "no hang": bounded by the configured timeout + this
FAST = 0.5                  # a request on a FAILED device must fail within this
CLOSE_BOUND = 2.0           # close() must return within this
TEST_DEADLINE = 40.0        # no test may run longer (the longest bound below is 30 s)
DISK_SIZE = 4 << 20
PREFILL = 0xEE              # the caller's buffer before a read: never a disk byte (see pattern)

#: the front-end's messages for one queue, in order (message N is HANDSHAKE[N - 1])
# Features are settled before the config is read: its fields mean what the features say.
HANDSHAKE = ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
             "GET_QUEUE_NUM", "SET_FEATURES", "GET_CONFIG", "SET_MEM_TABLE", "SET_VRING_NUM",
             "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_KICK",
             "SET_VRING_ENABLE"]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def fault_summary(request):
    """Print how many faults of each kind this module injected (shown even without -s)."""
    before = collections.Counter(INJECTED)
    yield
    delta = {k: v - before.get(k, 0) for k, v in INJECTED.items() if v - before.get(k, 0)}
    lines = [f"  {k:32s} {v}" for k, v in sorted(delta.items())]
    text = (f"\nfaults injected by tests/fake_vhost_user.py: {sum(delta.values())} in "
            f"{len(delta)} kinds\n" + "\n".join(lines) + "\n")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print(text)
    else:
        print(text)


def _our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.is_alive() and t.name.startswith(("vblk", "fake-vhost", "test-"))]


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _hung(signum, frame):
    pytest.fail(f"the test was still running after {TEST_DEADLINE:g}s: something hangs")


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """No driver, fake or test thread and no file descriptor survives a test, and no test
    (set-up and teardown included) runs longer than TEST_DEADLINE: a hang fails the test (a
    SIGALRM interrupts the main thread's wait) instead of stalling the whole run."""
    old_handler = signal.signal(signal.SIGALRM, _hung)
    signal.setitimer(signal.ITIMER_REAL, TEST_DEADLINE)
    try:
        before = set(_our_threads())        # (a stuck thread of an earlier failure is its own)
        fds = _fd_count()
        yield

        def new_threads():
            return [t for t in _our_threads() if t not in before]

        assert wait_for(lambda: not new_threads(), 5), f"threads left behind: {new_threads()}"
        assert wait_for(lambda: _fd_count() <= fds, 2), f"fds leaked: {fds} -> {_fd_count()}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "vu.sock")


@pytest.fixture
def fakes():
    """``fakes(path, **kw)`` starts a FakeVhostUserBlk; all are stopped at teardown."""
    made: list[FakeVhostUserBlk] = []

    def make(path, disk=None, **kw) -> FakeVhostUserBlk:
        if disk is None:
            disk = bytearray(pattern(DISK_SIZE, seed=9))
        fake = FakeVhostUserBlk(path, disk, **kw).start()
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.stop()


@pytest.fixture
def devices():
    """``devices(path, **kw)`` opens a BlockDevice with short timeouts and no reconnect; all
    are closed at teardown, and close() must be prompt."""
    made: list[BlockDevice] = []

    def make(path, **kw) -> BlockDevice:
        kw.setdefault("control_timeout", CONTROL_TIMEOUT)
        kw.setdefault("request_timeout", REQUEST_TIMEOUT)
        kw.setdefault("reconnect_timeout", 0)
        dev = open_device(path, **kw)
        made.append(dev)
        return dev

    make.made = made
    yield make
    for dev in made:
        t0 = time.monotonic()
        dev.close()
        assert time.monotonic() - t0 < CLOSE_BOUND, "close() was slow"


@contextmanager
def bounded(limit: float):
    """Assert the block takes less than ``limit`` seconds of wall time."""
    t0 = time.monotonic()
    yield
    elapsed = time.monotonic() - t0
    assert elapsed < limit, f"took {elapsed:.2f}s, bound {limit:.2f}s"


def expect_error(exc_type, match: str, fn, *args, limit: float, errno_: int | None = None,
                 **kw) -> BaseException:
    """Call fn; it must raise exactly a (subclass of) ``exc_type`` whose message matches
    ``match``, within ``limit`` seconds.  Anything else (another exception, success) fails."""
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        fn(*args, **kw)
    elapsed = time.monotonic() - t0
    assert elapsed < limit, f"{fn.__name__} took {elapsed:.2f}s to fail, bound {limit:.2f}s"
    assert re.search(match, str(info.value)), f"message {str(info.value)!r} !~ {match!r}"
    if errno_ is not None:
        assert info.value.errno == errno_, (info.value.errno, str(info.value))
    return info.value


def join_all(threads, timeout: float) -> None:
    """Join ``threads`` within one overall ``timeout``; fail if any is still alive."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"still blocked after {timeout:g}s: {stuck}"


def assert_failed_fast(dev: BlockDevice, failure: str | None = None) -> None:
    """The device reached FAILED; every kind of request then fails at once with EIO."""
    assert wait_for(lambda: dev.state is DeviceState.FAILED, REQUEST_TIMEOUT + SLACK), dev.state
    if failure is not None:
        assert re.search(failure, dev.failure or ""), dev.failure
    buf = bytearray(4096)
    for op in (lambda: dev.pread(buf, 0), lambda: dev.pwrite(bytes(4096), 0),
               lambda: dev.flush(), lambda: dev.discard(0, 4096), lambda: dev.get_id()):
        t0 = time.monotonic()
        with pytest.raises(RequestError) as info:
            op()
        assert time.monotonic() - t0 < FAST
        assert info.value.errno == errno.EIO
        assert "failed" in str(info.value)
    t0 = time.monotonic()
    dev.close()
    assert time.monotonic() - t0 < CLOSE_BOUND
    assert dev.state is DeviceState.CLOSED


def assert_no_foreign_bytes(buf: bytes | bytearray, disk: bytes | bytearray,
                            offset: int) -> None:
    """Every 512-byte sector of the caller's buffer is either untouched (PREFILL) or exactly
    the disk's sector at that position: nothing stale, nothing from another request."""
    for pos in range(0, len(buf), 512):
        got = bytes(buf[pos:pos + 512])
        if got == bytes([PREFILL]) * len(got):
            continue
        want = bytes(disk[offset + pos:offset + pos + len(got)])
        assert got == want, (f"sector at buffer offset {pos} holds foreign bytes "
                             f"{got[:24]!r}..., expected {want[:24]!r} or the prefill")


# --- a healthy fake is faithful --------------------------------------------------------------


HEALTHY_VARIANTS = {
    "qsd-like": {},
    "4-queues": {"num_queues": 4},
    "no-event-idx": {"features": QSD_FEATURES & ~(1 << F_EVENT_IDX)},
    "spurious-calls": {"signal_always": True},
    "no-reply-ack": {"protocol_features": QSD_PROTOCOL_FEATURES & ~(1 << P_REPLY_ACK)},
    "size-max-4k": {"features": QSD_FEATURES | (1 << F_SIZE_MAX),
                    "config": {"size_max": 4096, "seg_max": 16}},
    "blk-size-4k": {"config": {"blk_size": 4096}},
}


@pytest.mark.parametrize("variant", list(HEALTHY_VARIANTS))
def test_healthy_fake_serves_verified_io(sock, fakes, devices, variant):
    """No faults: the fake, driven by a real BlockDevice, moves exactly the right bytes both
    ways (checked against its disk), answers every request type, sees no driver violation."""
    fake = fakes(sock, **HEALTHY_VARIANTS[variant])
    dev = devices(sock, bounce_buffer_size=64 << 10, bounce_buffers=8)
    assert dev.capacity == DISK_SIZE
    assert dev.state is DeviceState.CONNECTED
    # without REPLY_ACK the front-end does not wait for the back-end to act on its messages
    assert fake.handshake_done.wait(5)
    assert fake.negotiated_features >> F_VERSION_1 & 1
    # device -> driver: what is on the fake's disk comes back
    buf = bytearray(300 << 10)
    dev.pread(buf, 8192)
    assert buf == fake.disk[8192:8192 + len(buf)]
    # driver -> device, multi-request transfers, several threads (several queues)
    errors = []

    def worker(k: int) -> None:
        try:
            base = (1 << 20) + k * (256 << 10)
            data = pattern(200 << 10, seed=k + 1, base=base)
            dev.pwrite(data, base)
            back = bytearray(len(data))
            dev.pread(back, base)
            assert back == data
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), name=f"test-worker-{k}",
                                daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    join_all(threads, 20)
    assert not errors, errors
    for k in range(4):
        base = (1 << 20) + k * (256 << 10)
        assert fake.disk[base:base + (200 << 10)] == pattern(200 << 10, seed=k + 1, base=base)
    assert dev.get_id() == b"fake-blk"
    dev.flush()
    dev.discard(0, 8192)
    dev.write_zeroes(1 << 20, 8192)
    assert fake.disk[0:8192] == bytes(8192)
    assert fake.disk[1 << 20:(1 << 20) + 8192] == bytes(8192)
    for op in ("read", "write", "flush", "get_id", "discard", "write_zeroes"):
        assert fake.ops[op] >= 1, fake.ops
    totals = dev.stats()["totals"]
    assert totals["errors"] == 0 and totals["in_flight"] == 0
    assert fake.completed == fake.requests == totals["requests"]
    assert fake.violations == []
    assert not fake.injected
    if variant == "4-queues":
        assert dev.num_queues == 4
        assert sum(1 for q in dev.stats()["queues"] if q["requests"]) >= 2
    if variant == "size-max-4k":
        assert dev.max_transfer <= 4096 * 16


def test_reconnect_to_replacement_fake_resubmits_in_flight(sock, fakes, devices):
    """A back-end that vanishes mid-workload (connection and socket gone, requests in flight)
    and a fresh one started on the same socket, serving the same disk: with reconnect_timeout
    the in-flight requests are resubmitted; every caller sees success and correct data."""
    disk = bytearray(pattern(DISK_SIZE, seed=9))
    first = fakes(sock, disk, num_queues=2, io_fault="vanish", io_fault_at=25)
    dev = devices(sock, request_timeout=10, reconnect_timeout=15,
                  bounce_buffer_size=16 << 10, bounce_buffers=16)
    assert dev.num_queues == 2
    errors, reads = [], collections.Counter()

    def worker(k: int) -> None:
        try:
            base = k * (512 << 10)
            for it in range(6):
                data = pattern(64 << 10, seed=100 * k + it, base=base)
                dev.pwrite(data, base)
                back = bytearray([PREFILL]) * len(data)
                dev.pread(back, base)
                assert back == data, f"worker {k} iteration {it}: wrong data"
                reads[k] += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,), name=f"test-worker-{k}",
                                daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    assert first.wait_gone(10), "the first fake never vanished"
    assert first.injected["vanish"] == 1
    assert not os.path.exists(sock)
    second = fakes(sock, disk, num_queues=2)
    join_all(threads, 30)
    assert not errors, errors
    assert reads == {k: 6 for k in range(4)}
    for k in range(4):
        base = k * (512 << 10)
        assert disk[base:base + (64 << 10)] == pattern(64 << 10, seed=100 * k + 5, base=base)
    assert dev.reconnects == 1
    assert dev.state is DeviceState.CONNECTED
    assert second.requests > 0 and second.connections == 1
    assert first.violations == [] and second.violations == []
    # 4 workers x 6 iterations x (4 write + 4 read requests of 16 KiB) = 192 requests, each
    # completed once as far as the driver is concerned; the first fake took request 25 and
    # went away, so at least that one was resubmitted to the second
    assert dev.stats()["totals"]["requests"] == 192
    assert first.requests > first.completed
    assert first.completed + second.completed >= 192


def test_stuck_request_times_out_and_is_resubmitted_after_reconnect(sock, fakes, devices):
    """A device that sits on one request: after request_timeout the session counts as lost,
    the driver reconnects (to the same back-end, which accepts the next front-end) and the
    request is resubmitted and served correctly."""
    fake = fakes(sock, io_fault="drop", io_fault_at=1)
    dev = devices(sock, reconnect_timeout=5)
    data = pattern(64 << 10, seed=3, base=65536)
    dev.pwrite(data, 65536)                               # request 0
    back = bytearray([PREFILL]) * len(data)
    with bounded(REQUEST_TIMEOUT + SLACK):
        dev.pread(back, 65536)                            # request 1: dropped, then resubmitted
    assert back == data
    assert fake.injected["drop"] == 1
    assert dev.reconnects == 1 and fake.connections == 2
    assert dev.state is DeviceState.CONNECTED
    assert fake.violations == []


# --- the control connection ----------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, len(HANDSHAKE) + 1))
def test_backend_closes_during_handshake(sock, fakes, n):
    """The back-end hangs up when message N arrives: a TransportError naming the message
    (or the next one, if N needs no reply), quickly, and nothing left open."""
    fake = fakes(sock, close_after=n)
    err = expect_error(TransportError, "closed the connection|failed", open_device, sock,
                       control_timeout=CONTROL_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
                       limit=CONTROL_TIMEOUT + SLACK)
    names = HANDSHAKE[n - 1:n + 1]
    assert any(name in str(err) for name in names), (str(err), names)
    assert sock in str(err)
    assert fake.injected["close_after"] == 1
    assert fake.messages[0] == HANDSHAKE[:n]


@pytest.mark.parametrize("n", [2, 3, 6, 8, 11, 14])
def test_backend_stops_answering(sock, fakes, n):
    """The back-end reads but never replies from message N on (a hung daemon, or one busy with
    another front-end): ControlTimeout after about control_timeout, naming the request."""
    fake = fakes(sock, silent_from=n)
    t0 = time.monotonic()
    err = expect_error(ControlTimeout, r"did not answer (\w+) within 1s", open_device, sock,
                       control_timeout=CONTROL_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
                       limit=CONTROL_TIMEOUT + SLACK)
    assert time.monotonic() - t0 >= CONTROL_TIMEOUT * 0.9
    assert HANDSHAKE[n - 1] in str(err)
    assert err.errno == errno.ETIMEDOUT
    assert fake.injected["silent"] >= 1


BAD_REPLY_CASES = [
    # (request, how, exception, message)
    (Req.GET_FEATURES, "code", ProtocolError, r"answered GET_FEATURES with a reply to request 17"),
    (Req.GET_FEATURES, "flags", ProtocolError, r"reply to GET_FEATURES has flags 0x1"),
    (Req.GET_FEATURES, "version", ProtocolError, r"reply to GET_FEATURES has flags 0x6"),
    (Req.GET_FEATURES, "short", ProtocolError, r"GET_FEATURES is 4 bytes, expected 8"),
    (Req.GET_FEATURES, "huge", ProtocolError, r"GET_FEATURES claims a 4294967280-byte"),
    (Req.GET_FEATURES, "truncated", ControlTimeout, r"did not answer GET_FEATURES"),
    # one byte every 0.5 s: each recv() is quick, the reply as a whole is not (bounded by the
    # exchange's deadline, not per read)
    (Req.GET_FEATURES, "trickle", ControlTimeout, r"did not answer GET_FEATURES within 1s"),
    (Req.GET_PROTOCOL_FEATURES, "short", ProtocolError, r"GET_PROTOCOL_FEATURES is 4 bytes"),
    (Req.GET_QUEUE_NUM, "huge", ProtocolError, r"GET_QUEUE_NUM claims"),
    (Req.GET_QUEUE_NUM, "code", ProtocolError, r"answered GET_QUEUE_NUM with a reply to req"),
    (Req.GET_CONFIG, "flags", ProtocolError, r"reply to GET_CONFIG has flags"),
    (Req.GET_CONFIG, "huge", ProtocolError, r"GET_CONFIG claims"),
    (Req.SET_FEATURES, "short", ProtocolError, r"ack for SET_FEATURES is 4 bytes"),
    (Req.SET_MEM_TABLE, "code", ProtocolError, r"answered SET_MEM_TABLE with a reply to"),
    (Req.SET_MEM_TABLE, "nack", TransportError, r"refused SET_MEM_TABLE"),
    (Req.SET_VRING_ADDR, "huge", ProtocolError, r"SET_VRING_ADDR claims"),
    (Req.SET_VRING_KICK, "nack", TransportError, r"refused SET_VRING_KICK"),
    (Req.SET_VRING_ENABLE, "flags", ProtocolError, r"SET_VRING_ENABLE has flags"),
    (Req.SET_VRING_ENABLE, "truncated", ControlTimeout, r"did not answer SET_VRING_ENABLE"),
]


@pytest.mark.parametrize("req,how,exc,match", BAD_REPLY_CASES,
                         ids=[f"{r.name}-{h}" for r, h, _e, _m in BAD_REPLY_CASES])
def test_malformed_reply(sock, fakes, req, how, exc, match):
    """A malformed reply (wrong request code, wrong flags, short payload, absurd size field,
    a payload that never finishes, a refusal) fails the handshake with a clear error."""
    fake = fakes(sock, bad_reply=(req, how))
    expect_error(exc, match, open_device, sock, control_timeout=CONTROL_TIMEOUT,
                 request_timeout=REQUEST_TIMEOUT, limit=CONTROL_TIMEOUT + SLACK)
    assert fake.injected[f"bad_reply:{how}"] == 1


@pytest.mark.parametrize("features,protocol,match", [
    (QSD_FEATURES & ~(1 << F_VERSION_1), QSD_PROTOCOL_FEATURES,
     r"does not offer VIRTIO_F_VERSION_1"),
    (QSD_FEATURES & ~(1 << F_PROTOCOL_FEATURES), QSD_PROTOCOL_FEATURES,
     r"does not offer VHOST_USER_F_PROTOCOL_FEATURES"),
    (QSD_FEATURES, QSD_PROTOCOL_FEATURES & ~(1 << P_CONFIG), r"lacks the CONFIG protocol"),
], ids=["no-version-1", "no-protocol-features", "no-config"])
def test_missing_features(sock, fakes, features, protocol, match):
    """A back-end without VIRTIO_F_VERSION_1 (legacy), without protocol features or without
    the CONFIG protocol feature is refused with a ConnectError saying which is missing."""
    fake = fakes(sock, features=features, protocol_features=protocol)
    expect_error(ConnectError, match, open_device, sock, control_timeout=CONTROL_TIMEOUT,
                 limit=CONTROL_TIMEOUT + SLACK)
    INJECTED["missing_feature"] += 1
    assert "GET_FEATURES" in fake.messages[0]
    assert fake.negotiated_features is None  # never got as far as SET_FEATURES


@pytest.mark.parametrize("config,exc,match", [
    ({"capacity": 0}, DeviceError, r"capacity 0"),
    ({"capacity": 1 << 62}, DeviceError, r"absurd capacity"),
    ({"capacity": (1 << 64) - 1}, DeviceError, r"absurd capacity"),
    ({"blk_size": 1000}, DeviceError, r"block size 1000"),
    ({"blk_size": 1 << 20}, DeviceError, r"block size 1048576"),
    ({"blk_size": 0}, DeviceError, r"block size 0"),
    ({"blk_size": 4096, "capacity": 9}, DeviceError, r"not a multiple of the block size"),
    ({"seg_max": 0}, DeviceError, r"seg_max 0"),
    ({"num_queues": 0}, DeviceError, r"num_queues 0"),
    ({"max_discard_sectors": 0}, DeviceError, r"DISCARD with a zero"),
    ({"max_write_zeroes_seg": 0}, DeviceError, r"WRITE_ZEROES with a zero"),
], ids=["capacity-0", "capacity-2^62-sectors", "capacity-max", "blk-1000", "blk-1M", "blk-0",
        "capacity-not-blocks", "seg-max-0", "num-queues-0", "max-discard-0", "wz-seg-0"])
def test_absurd_config(sock, fakes, config, exc, match):
    """Config space values that make no sense are refused at construction (DeviceError)."""
    fake = fakes(sock, config=config)
    expect_error(exc, match, open_device, sock, control_timeout=CONTROL_TIMEOUT,
                 limit=CONTROL_TIMEOUT + SLACK)
    assert "GET_CONFIG" in fake.messages[0]       # the driver did read the bad config
    INJECTED["config:" + ",".join(config)] += 1


@pytest.mark.parametrize("queue_num,match", [(0, r"reports 0 queues"),
                                             (1 << 20, r"reports 1048576 queues")])
def test_absurd_queue_num(sock, fakes, queue_num, match):
    fake = fakes(sock, queue_num=queue_num)
    expect_error(ProtocolError, match, open_device, sock, control_timeout=CONTROL_TIMEOUT,
                 limit=CONTROL_TIMEOUT + SLACK)
    assert fake.messages[0][-1] == "GET_QUEUE_NUM"
    INJECTED["queue_num"] += 1


@pytest.mark.parametrize("how,match", [
    ("empty", r"GET_CONFIG\(60 bytes\) with a 0-byte payload"),
    ("short_header", r"GET_CONFIG\(60 bytes\) with a 6-byte payload"),
    ("wrong_offset", r"GET_CONFIG reply is malformed \(offset 4"),
    ("oversize", r"GET_CONFIG reply is malformed"),
])
def test_bad_get_config_reply(sock, fakes, how, match):
    """GET_CONFIG answered with an empty payload (what the daemon does for a size it does not
    support), a cut header, the wrong offset or more bytes than asked: ProtocolError."""
    fake = fakes(sock, config_reply=how)
    expect_error(ProtocolError, match, open_device, sock, control_timeout=CONTROL_TIMEOUT,
                 limit=CONTROL_TIMEOUT + SLACK)
    assert fake.injected[f"config_reply:{how}"] == 1


def test_backend_closes_right_after_handshake(sock, fakes, devices):
    """The back-end acks the last ring and hangs up: whichever side of the race construction
    lands on, the device ends up FAILED (no reconnect) and requests fail fast with EIO."""
    fake = fakes(sock, close_after_handshake=True)
    try:
        dev = devices(sock)
    except TransportError as e:
        assert re.search(r"closed the connection|failed", str(e))
    else:
        assert_failed_fast(dev, r"closed the vhost-user connection")
    assert fake.injected["close_after_handshake"] == 1


def test_unsolicited_message_after_handshake(sock, fakes, devices):
    """A back-end that sends something nobody asked for is treated as lost: FAILED."""
    fake = fakes(sock, unsolicited_after_handshake=True)
    dev = devices(sock)
    assert_failed_fast(dev, r"unsolicited vhost-user message")
    assert fake.injected["unsolicited"] == 1


# --- the data plane --------------------------------------------------------------------------


RING_VIOLATIONS = {
    "id_out_of_range": r"completed descriptor 263, which is not an in-flight request head",
    "len_too_big": r"reported \d+ bytes written to a chain that allows \d+",
    "used_idx_jump": r"moved the used index by \d+ with \d+ requests in flight",
    # the same id twice in one update: the index moved past what is in flight
    "double_complete": r"moved the used index by 2 with 1 requests in flight",
}


@pytest.mark.parametrize("fault", list(RING_VIOLATIONS))
def test_ring_protocol_violation_fails_device(sock, fakes, devices, fault):
    """The device breaks the used-ring protocol on a read: the read fails with EIO (or, for a
    duplicated completion, the first completion is honoured and correct) and never returns
    bytes that are not the disk's; the device is FAILED; everything after fails fast."""
    fake = fakes(sock, io_fault=fault, io_fault_at=1)
    dev = devices(sock, queue_size=256)
    first = bytearray(64 << 10)
    dev.pread(first, 0)                                       # request 0, leaves data behind
    buf = bytearray([PREFILL]) * (64 << 10)
    with bounded(REQUEST_TIMEOUT + SLACK):
        try:
            dev.pread(buf, 1 << 20)                           # request 1: the fault
        except RequestError as e:
            assert e.errno == errno.EIO
            assert re.search(RING_VIOLATIONS[fault], str(e)), str(e)
        else:
            # the read's own completion was fine; the damage came with or after it
            assert fault in ("double_complete", "used_idx_jump"), \
                "a broken completion was taken as success"
            assert buf == fake.disk[1 << 20:(1 << 20) + len(buf)]
    assert_no_foreign_bytes(buf, fake.disk, 1 << 20)
    assert fake.injected[fault] == 1
    assert_failed_fast(dev, RING_VIOLATIONS[fault])


@pytest.mark.parametrize("short_bytes", [0, 512, (64 << 10) - 512])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-request", "four-requests"])
def test_short_read_never_leaks_stale_bytes(sock, fakes, devices, short_bytes, chunked):
    """A read the device answers short (len < data + 1, status OK), leaving the bounce buffer
    holding another request's data: the read fails with EIO and the caller's buffer gets no
    stale byte (it holds the prefill or the right disk bytes, sector by sector)."""
    chunk = (16 << 10) if chunked else (64 << 10)
    short = min(short_bytes, chunk - 512)
    # request numbers: the first read is 64 KiB / chunk requests; fault the 3rd chunk (or only)
    per_read = (64 << 10) // chunk
    fault_at = per_read + (2 if chunked else 0)
    fake = fakes(sock, io_fault="short_read", io_fault_at=fault_at, short_bytes=short)
    dev = devices(sock, bounce_buffer_size=chunk, bounce_buffers=4)
    other = bytearray(64 << 10)
    dev.pread(other, 0)                  # fills the bounce buffers with sectors 0..127
    assert other == fake.disk[:64 << 10]
    buf = bytearray([PREFILL]) * (64 << 10)
    err = expect_error(RequestError, r"short read, the device reported \d+ of \d+ bytes",
                       dev.pread, buf, 2 << 20, limit=REQUEST_TIMEOUT + SLACK,
                       errno_=errno.EIO)
    assert f"reported {short} of {chunk}" in str(err)
    assert fake.injected["short_read"] == 1
    assert_no_foreign_bytes(buf, fake.disk, 2 << 20)
    assert bytes(other[:512]) not in bytes(buf)
    # the faulted request's part (and everything after it) must be untouched
    assert buf[2 * chunk if chunked else 0:] == bytearray([PREFILL]) * (
        len(buf) - (2 * chunk if chunked else 0))
    # a bad length is the request's problem, not the device's: the next read works
    again = bytearray(64 << 10)
    dev.pread(again, 2 << 20)
    assert again == fake.disk[2 << 20:(2 << 20) + (64 << 10)]
    assert dev.state is DeviceState.CONNECTED


@pytest.mark.parametrize("status,errno_,match", [
    (1, errno.EIO, "I/O error"), (2, errno.EOPNOTSUPP, "unsupported"),
    (7, errno.EPROTO, "invalid status 7"), (0xFF, errno.EPROTO, "invalid status 255"),
])
def test_bad_status_byte(sock, fakes, devices, status, errno_, match):
    """The device serves a read but writes status ``status``: that read (only) fails with the
    mapped errno and its data is not handed over; a write likewise; the device carries on."""
    fake = fakes(sock, io_fault="bad_status", io_fault_at=1, io_fault_count=2,
                 bad_status=status)
    dev = devices(sock)
    dev.pread(bytearray(4096), 0)                                   # request 0
    buf = bytearray([PREFILL]) * 8192
    expect_error(RequestError, match, dev.pread, buf, 65536, limit=REQUEST_TIMEOUT + SLACK,
                 errno_=errno_)                                     # request 1
    assert buf == bytearray([PREFILL]) * 8192, "data of a failed read reached the caller"
    expect_error(RequestError, match, dev.pwrite, bytes(4096), 0, limit=REQUEST_TIMEOUT + SLACK,
                 errno_=errno_)                                     # request 2
    assert fake.injected["bad_status"] == 2
    back = bytearray(8192)
    dev.pread(back, 65536)
    assert back == fake.disk[65536:65536 + 8192]
    assert dev.state is DeviceState.CONNECTED


def test_status_byte_never_written(sock, fakes, devices):
    """The device completes a read with the full length but never writes the status byte: the
    previous request's OK in that slot must not count; EPROTO, no data handed over."""
    fake = fakes(sock, io_fault="no_status", io_fault_at=1)
    dev = devices(sock)
    dev.pread(bytearray(4096), 0)            # request 0: status OK left in the slot
    buf = bytearray([PREFILL]) * 4096
    expect_error(RequestError, r"invalid status 255", dev.pread, buf, 8192,
                 limit=REQUEST_TIMEOUT + SLACK, errno_=errno.EPROTO)
    assert buf == bytearray([PREFILL]) * 4096
    assert fake.injected["no_status"] == 1
    dev.pread(buf, 8192)
    assert buf == fake.disk[8192:8192 + 4096]


def test_replayed_completion_is_not_taken_for_the_new_request(sock, fakes, devices):
    """The device does not serve a read but republishes the previous completion (same id, same
    length).  The descriptor was reused, so to the driver it looks like a completion of the
    new read: the preset status byte gives it away (EPROTO), and the previous read's bytes
    still sitting in the bounce buffer never reach the caller."""
    fake = fakes(sock, io_fault="replay", io_fault_at=1)
    dev = devices(sock)
    prev = bytearray(64 << 10)
    dev.pread(prev, 0)
    buf = bytearray([PREFILL]) * (64 << 10)
    with bounded(REQUEST_TIMEOUT + SLACK):
        with pytest.raises(RequestError) as info:
            dev.pread(buf, 1 << 20)
    assert info.value.errno in (errno.EPROTO, errno.EIO), info.value
    assert re.search(r"invalid status 255|not an in-flight", str(info.value)), info.value
    assert buf == bytearray([PREFILL]) * len(buf)
    assert fake.injected["replay"] == 1


def test_dropped_request_times_out(sock, fakes, devices):
    """A device that never completes a request: the caller gets EIO after about
    request_timeout (not later), the device is FAILED (no reconnect), the rest fails fast."""
    fake = fakes(sock, io_fault="drop", io_fault_at=1, io_fault_count=None)
    dev = devices(sock)
    dev.pread(bytearray(4096), 0)
    buf = bytearray([PREFILL]) * 4096
    t0 = time.monotonic()
    expect_error(RequestError, r"did not complete within 1s", dev.pread, buf, 8192,
                 limit=REQUEST_TIMEOUT + SLACK, errno_=errno.EIO)
    assert time.monotonic() - t0 >= REQUEST_TIMEOUT * 0.9
    assert buf == bytearray([PREFILL]) * 4096
    assert fake.injected["drop"] == 1
    assert_failed_fast(dev, r"did not complete within")


@pytest.mark.parametrize("op", ["pread", "pwrite", "flush", "discard", "write_zeroes"])
def test_disconnect_with_request_in_flight(sock, fakes, devices, op):
    """The back-end hangs up while a request is in flight and reconnecting is off: that request
    fails with EIO promptly (no wait for request_timeout), the device is FAILED."""
    fake = fakes(sock, io_fault="disconnect", io_fault_at=0)
    dev = devices(sock, request_timeout=10)
    calls = {"pread": lambda: dev.pread(bytearray(4096), 0),
             "pwrite": lambda: dev.pwrite(bytes(4096), 0),
             "flush": dev.flush,
             "discard": lambda: dev.discard(0, 4096),
             "write_zeroes": lambda: dev.write_zeroes(0, 4096)}
    expect_error(RequestError, r"device lost: the back-end closed the vhost-user connection",
                 calls[op], limit=SLACK, errno_=errno.EIO)
    assert fake.injected["disconnect"] == 1
    assert_failed_fast(dev, r"closed the vhost-user connection")


def test_full_ring_with_a_silent_device_does_not_hang(sock, fakes, devices):
    """One caller fills the ring (queue_size 4 holds one read) with a transfer of several
    requests and the device completes none: the caller must get EIO within about
    request_timeout, not wait for ring space forever."""
    fake = fakes(sock, io_fault="drop", io_fault_at=0, io_fault_count=None)
    dev = devices(sock, queue_size=4, bounce_buffer_size=4096, bounce_buffers=8)
    result = {}

    def run():
        try:
            dev.pread(bytearray(16384), 0)
            result["ok"] = True
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=run, name="test-caller", daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(REQUEST_TIMEOUT + SLACK)
    hung = t.is_alive()
    if hung:
        dev.close()            # unblocks the caller (it waits for ring space)
        t.join(5)
    assert not hung, f"pread still blocked after {time.monotonic() - t0:.1f}s"
    assert isinstance(result.get("error"), RequestError), result
    assert result["error"].errno == errno.EIO
    assert fake.injected["drop"] >= 1
    assert_failed_fast(dev)


@pytest.mark.parametrize("queue_size", [1, 2])
def test_queue_too_small_for_one_request(sock, fakes, devices, queue_size):
    """A queue that cannot hold even one request chain (a read takes 3 descriptors) must be
    refused (ConfigError) or work, never block the first request forever."""
    fakes(sock)
    result = {}

    def run():
        try:
            dev = devices(sock, queue_size=queue_size)
            dev.pread(bytearray(4096), 0)
            result["ok"] = True
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=run, name="test-caller", daemon=True)
    t.start()
    t.join(REQUEST_TIMEOUT + SLACK)
    hung = t.is_alive()
    INJECTED["tiny_queue"] += 1
    if hung:
        for d in list(devices.made):
            d.close()          # unblocks the caller
        t.join(5)
    assert not hung, "the first request blocked forever"
    if "error" in result:
        assert isinstance(result["error"], ConfigError), result
        assert re.search(r"queue size", str(result["error"]))


@pytest.mark.parametrize("which", ["discard", "write_zeroes"])
def test_range_limit_below_one_block(sock, fakes, devices, which):
    """max_discard_sectors / max_write_zeroes_sectors smaller than one logical block (1 sector
    with 4 KiB blocks): refused at construction (DeviceError) or the operation fails with a
    RequestError; never a crash with a non-vblk exception."""
    key = "max_discard_sectors" if which == "discard" else "max_write_zeroes_sectors"
    fake = fakes(sock, config={"blk_size": 4096, key: 1})
    INJECTED[f"config:{key}<block"] += 1
    try:
        dev = devices(sock)
    except DeviceError as e:
        assert re.search(key, str(e)), str(e)
        return
    with bounded(REQUEST_TIMEOUT + SLACK):
        try:
            getattr(dev, which)(0, 8192)
        except VblkError as e:
            assert isinstance(e, RequestError), repr(e)
        else:
            assert fake.disk[:8192] == bytes(8192)
    buf = bytearray(8192)
    dev.pread(buf, 0)                  # the device is still usable
    assert buf == fake.disk[:8192]


def test_one_bad_queue_among_many_threads(sock, fakes, devices):
    """Four threads on four queues while the device breaks the ring protocol once: each call
    either succeeds with exactly the disk's data or fails with EIO; none hangs; then FAILED."""
    fake = fakes(sock, num_queues=4, io_fault="id_out_of_range", io_fault_at=30)
    dev = devices(sock, bounce_buffer_size=16 << 10, bounce_buffers=16)
    outcomes = collections.Counter()
    problems = []

    def worker(k: int) -> None:
        base = k * (256 << 10)
        for it in range(20):
            buf = bytearray([PREFILL]) * (48 << 10)
            try:
                dev.pread(buf, base + it * 4096)
            except RequestError as e:
                if e.errno != errno.EIO:
                    problems.append(e)
                outcomes["error"] += 1
            except BaseException as e:  # noqa: BLE001
                problems.append(e)
            else:
                outcomes["ok"] += 1
            try:
                assert_no_foreign_bytes(buf, fake.disk, base + it * 4096)
            except AssertionError as e:
                problems.append(e)

    threads = [threading.Thread(target=worker, args=(k,), name=f"test-worker-{k}",
                                daemon=True) for k in range(4)]
    with bounded(2 * REQUEST_TIMEOUT + SLACK):
        for t in threads:
            t.start()
        join_all(threads, 2 * REQUEST_TIMEOUT + SLACK)
    assert not problems, problems
    assert outcomes["ok"] >= 1 and outcomes["error"] >= 1, outcomes
    assert fake.injected["id_out_of_range"] == 1
    assert_failed_fast(dev, r"not an in-flight request head")


# --- property: any fault, anywhere in a workload ---------------------------------------------

_PROPERTY_FAULTS = ["id_out_of_range", "double_complete", "replay", "len_too_big",
                    "short_read", "bad_status", "no_status", "used_idx_jump", "disconnect"]
_REQUEST_LEVEL = {"short_read", "bad_status", "no_status"}
# "replay" is either: the replayed id may name a reused (in-flight) descriptor or a free one
_RING_LEVEL = {"id_out_of_range", "double_complete", "len_too_big", "used_idx_jump",
               "disconnect"}
_counter = itertools.count()


@pytest.mark.parametrize("fault", _PROPERTY_FAULTS)
def test_any_fault_anywhere(tmp_path, fault):
    """Random workloads (reads and writes of 1..12 blocks of 4 KiB, 16 KiB per request) with
    the fault at a random request: every read either returns exactly the disk's bytes or
    raises a RequestError and leaves only disk bytes or the prefill in the buffer; every call
    is bounded; a ring-protocol fault ends in FAILED, a request-level one does not; close()
    is prompt.  Across the examples the fault must actually have been injected."""
    injected = collections.Counter()

    @settings(max_examples=12, deadline=None, derandomize=True, database=None)
    @given(fault_at=st.integers(0, 14),
           ops=st.lists(st.tuples(st.booleans(), st.integers(0, 63), st.integers(1, 12)),
                        min_size=4, max_size=10))
    def example(fault_at, ops):
        injected[fault] += _one_workload(str(tmp_path / f"p{next(_counter)}.sock"), fault,
                                         fault_at, ops)

    example()
    assert injected[fault] >= 1, "the fault was never injected"


def _one_workload(path: str, fault: str, fault_at: int, ops) -> int:
    fake = FakeVhostUserBlk(path, bytearray(pattern(DISK_SIZE, seed=5)), io_fault=fault,
                            io_fault_at=fault_at).start()
    dev = None
    try:
        dev = open_device(path, control_timeout=CONTROL_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
                          reconnect_timeout=0, bounce_buffer_size=16 << 10, bounce_buffers=4)
        failed_calls = 0
        for i, (is_read, block, nblocks) in enumerate(ops):
            offset, length = block * 4096, nblocks * 4096
            t0 = time.monotonic()
            try:
                if is_read:
                    buf = bytearray([PREFILL]) * length
                    try:
                        dev.pread(buf, offset)
                    finally:
                        assert_no_foreign_bytes(buf, fake.disk, offset)
                    assert buf == fake.disk[offset:offset + length]
                else:
                    dev.pwrite(pattern(length, seed=1000 + i, base=offset), offset)
            except RequestError as e:
                assert e.errno in (errno.EIO, errno.EPROTO), e
                failed_calls += 1
            assert time.monotonic() - t0 < REQUEST_TIMEOUT + SLACK
        if fake.injected[fault]:
            if fault in _REQUEST_LEVEL:
                assert dev.state is DeviceState.CONNECTED
                assert failed_calls >= 1
            elif fault in _RING_LEVEL:
                assert wait_for(lambda: dev.state is DeviceState.FAILED, SLACK), dev.state
        else:
            assert failed_calls == 0
        assert fake.violations == []
        return fake.injected[fault]
    finally:
        if dev is not None:
            t0 = time.monotonic()
            dev.close()
            assert time.monotonic() - t0 < CLOSE_BOUND
        fake.stop()
