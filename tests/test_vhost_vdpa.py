"""The vhost-vdpa transport against a fake /dev/vhost-vdpa-N (tests/fake_vdpa.py): each ioctl
path and error, memory registration, and a whole BlockDevice moving data byte for byte.
The real device (qemu-storage-daemon's VDUSE export in a guest) is tests/test_vdpa_guest.py."""
from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from fake_ring_device import qsd_like_config
from fake_vdpa import FakeVdpaDevice
from vblk_core import BlockDevice, ConfigError, ConnectError, DeviceState, RequestError
from vblk_core.transports.vhost_vdpa import VhostVdpaConnector, VhostVdpaTransport
from vblk_core.virtio_blk import DRIVER_FEATURES

PATH = "/dev/vhost-vdpa-7"
DISK = 4 << 20


def make_fake(**kw) -> FakeVdpaDevice:
    disk = bytearray(random.Random(4).randbytes(DISK))
    return FakeVdpaDevice(disk, qsd_like_config(DISK, kw.pop("config_queues", 2)), **kw)


@pytest.fixture
def opened():
    """``opened(fake, **options)`` -> BlockDevice on the fake; closed at teardown, and the
    fake must have seen no errors and be closed again."""
    made: list[tuple[BlockDevice, FakeVdpaDevice]] = []

    def make(fake: FakeVdpaDevice, **options) -> BlockDevice:
        options.setdefault("request_timeout", 5)
        dev = BlockDevice.open(VhostVdpaConnector(PATH, ops=fake), **options)
        made.append((dev, fake))
        return dev

    yield make
    for dev, fake in made:
        dev.close()
        assert fake._fd == -1, "the device file was left open"
        assert not fake.errors, fake.errors


def test_data_reaches_the_device_byte_for_byte(opened):
    fake = make_fake()
    dev = opened(fake, num_queues=2, bounce_buffer_size=64 << 10, bounce_buffers=8)
    assert (dev.num_queues, dev.capacity, dev.read_only) == (2, DISK, False)
    data = random.Random(5).randbytes(300 << 10)
    dev.pwrite(data, 8192, fua=True)
    assert fake.disk[8192:8192 + len(data)] == data          # where it lands
    buf = bytearray(len(data) + 4096)
    dev.pread(buf, 4096)
    assert bytes(buf) == bytes(fake.disk[4096:4096 + len(buf)])
    dev.write_zeroes(0, 4096)
    assert fake.disk[:4096] == bytes(4096)
    dev.discard(1 << 20, 1 << 20)
    assert "FLUSH" not in fake.calls  # flushes are requests on the ring, not ioctls


def test_both_queues_carry_requests(opened):
    fake = make_fake()
    dev = opened(fake, num_queues=2)
    barrier = threading.Barrier(4)

    def worker(seed: int) -> None:
        barrier.wait()
        for i in range(20):
            dev.pwrite(bytes([seed]) * 4096, (seed * 64 + i) * 4096)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queues = dev.stats()["queues"]
    assert all(q["requests"] > 0 for q in queues), queues
    for seed in range(4):
        assert fake.disk[seed * 64 * 4096:(seed * 64 + 20) * 4096] == bytes([seed]) * 20 * 4096


def test_ioctl_sequence(opened):
    fake = make_fake()
    dev = opened(fake, num_queues=2)
    calls = fake.calls
    assert calls[:3] == ["SET_OWNER", "GET_DEVICE_ID", "SET_STATUS"]
    # reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK: each bit added to what status reads
    assert fake.status_writes == [0, 1, 3, 11, 15]
    assert calls.index("SET_STATUS") < calls.index("SET_BACKEND_FEATURES")
    assert calls.index("SET_BACKEND_FEATURES") < calls.index("SET_FEATURES")
    assert calls.index("SET_FEATURES") < calls.index("GET_CONFIG")
    mem = calls.index("IOTLB_UPDATE")
    assert calls[mem - 1:mem + 2] == ["IOTLB_BATCH_BEGIN", "IOTLB_UPDATE", "IOTLB_BATCH_END"]
    per_queue = ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK",
                 "SET_VRING_CALL", "SET_VRING_ENABLE"]
    first = calls.index("SET_VRING_NUM")
    assert calls[first:first + 12] == per_queue * 2
    assert first > mem
    # negotiated: what both offer, with ACCESS_PLATFORM (DMA through the IOTLB) kept
    assert fake.negotiated & (1 << 33) and fake.negotiated & (1 << 32)
    assert not fake.negotiated & (1 << 28), "INDIRECT_DESC is not implemented: must not ask"
    assert dev.features & (1 << 33) == 0, "ACCESS_PLATFORM is the transport's, not the device's"
    dev.close()
    assert calls[-3:] == ["SET_STATUS", "GET_STATUS", "IOTLB_INVALIDATE"]  # reset, then unmap
    assert fake.status_writes[-1] == 0


def test_memory_mapped_at_user_address_or_range_start(opened):
    fake = make_fake()
    opened(fake)
    ((iova, (size, uaddr)),) = fake.iotlb.items()
    assert iova == uaddr and size >= DISK // 64
    low = make_fake(iova_range=(0x10000, 0xFFFFFFFF))
    dev = opened(low, bounce_buffers=4)
    ((iova, (size, uaddr)),) = low.iotlb.items()
    assert iova == 0x10000 and uaddr != iova
    dev.pwrite(b"q" * 4096, 0)                # the device works in IOVA space
    assert low.disk[:4096] == b"q" * 4096


def test_no_batching_when_not_offered(opened):
    fake = make_fake(backend_features=0x2)    # IOTLB_MSG_V2 only
    opened(fake)
    assert "IOTLB_UPDATE" in fake.calls and "IOTLB_BATCH_BEGIN" not in fake.calls


@pytest.mark.parametrize("err, text", [
    (errno.ENOENT, "vdpa dev show"), (errno.EACCES, "permission denied"),
    (errno.EBUSY, "another process"),
])
def test_open_errors_name_the_fix(err, text):
    fake = make_fake(open_errno=err)
    with pytest.raises(ConnectError, match=text) as info:
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake))
    assert info.value.errno == err and PATH in str(info.value)


def test_second_open_is_busy(opened):
    fake = make_fake()
    opened(fake)
    with pytest.raises(ConnectError, match="busy") as info:
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake))
    assert info.value.errno == errno.EBUSY


EVERY_IOCTL = ["SET_OWNER", "GET_DEVICE_ID", "SET_STATUS", "GET_BACKEND_FEATURES",
               "SET_BACKEND_FEATURES", "GET_VQS_COUNT", "GET_VRING_NUM", "GET_IOVA_RANGE",
               "SET_CONFIG_CALL", "GET_FEATURES", "SET_FEATURES", "GET_STATUS",
               "GET_CONFIG_SIZE", "GET_CONFIG", "SET_VRING_NUM", "SET_VRING_BASE",
               "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ENABLE"]


@pytest.mark.parametrize("name", EVERY_IOCTL)
def test_each_ioctl_failure_is_a_connect_error_naming_it(name):
    fake = make_fake(fail={name: errno.EIO})
    with pytest.raises(ConnectError, match=f"VHOST_(VDPA_)?{name} failed") as info:
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake))
    assert info.value.errno == errno.EIO
    assert fake._fd == -1, "the device was left open after a failed set-up"


def test_not_a_vhost_vdpa_device():
    fake = make_fake(fail={"SET_OWNER": errno.ENOTTY})
    with pytest.raises(ConnectError, match="not a vhost-vdpa device"):
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake))


@pytest.mark.parametrize("kw, match", [
    ({"device_id": 1}, "not a block device .virtio device id 1"),
    ({"backend_features": 0}, "IOTLB_MSG_V2"),
    ({"features": 0x331007644 & ~(1 << 32)}, "VERSION_1"),
    ({"features_ok_sticks": False}, "FEATURES_OK did not stick"),
    ({"driver_ok_sticks": False}, "did not start"),
    ({"vqs": 0}, "reports 0 virtqueues"),
    ({"iova_range": (0, 0xFFFF)}, "does not fit its IOVA range"),
    ({"iova_range": (5, 4)}, "empty IOVA range"),
    ({"short_iotlb_write": True}, "short write"),
])
def test_device_refusals(kw, match):
    fake = make_fake(**kw)
    with pytest.raises(ConnectError, match=match):
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake))
    assert fake._fd == -1


def test_queue_limits_are_config_errors():
    fake = make_fake(vring_num=64)
    with pytest.raises(ConfigError, match="accepts up to 64"):
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake), queue_size=128)
    with pytest.raises(ConfigError, match="Too many queues requested: 3.*offers 2"):
        BlockDevice.open(VhostVdpaConnector(PATH, ops=fake), num_queues=3)
    with BlockDevice.open(VhostVdpaConnector(PATH, ops=fake), queue_size=64) as dev:
        dev.pwrite(b"z" * 512, 0)
    assert fake.disk[:512] == b"z" * 512


def _wait_state(dev: BlockDevice, state: DeviceState, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while dev.state is not state and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.state is state


def test_device_needs_reset_reconnects_and_keeps_working(opened):
    fake = make_fake()
    dev = opened(fake, num_queues=2, reconnect_timeout=10)
    dev.pwrite(b"a" * 4096, 0)
    fake.need_reset()
    deadline = time.monotonic() + 10
    while dev.reconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.reconnects == 1 and fake.opens == 2
    _wait_state(dev, DeviceState.CONNECTED)
    dev.pwrite(b"b" * 4096, 4096)
    assert fake.disk[:8192] == b"a" * 4096 + b"b" * 4096


def test_device_needs_reset_without_reconnect_fails_requests_with_eio(opened):
    fake = make_fake()
    dev = opened(fake, reconnect_timeout=0)
    fake.need_reset()
    _wait_state(dev, DeviceState.FAILED)
    assert "needs a reset" in dev.failure
    with pytest.raises(RequestError) as info:
        dev.pread(bytearray(512), 0)
    assert info.value.errno == errno.EIO


def test_in_flight_request_survives_a_reset(opened):
    """A request the device sits on when it breaks is resubmitted on the next session."""
    fake = make_fake()
    held = threading.Event()
    release = threading.Event()

    def hook(index, ring, chain):
        if not held.is_set():
            held.set()
            release.wait(5)
            return True  # never answered on this session
        return False

    fake.raw_hook = hook
    dev = opened(fake, num_queues=1, reconnect_timeout=10)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(dev.pwrite(b"r" * 4096, 0)))
    t.start()
    assert held.wait(5)
    fake.raw_hook = None
    threading.Timer(0.05, release.set).start()   # lets the held service thread stop
    fake.status |= 64                              # DEVICE_NEEDS_RESET ...
    os.eventfd_write(fake.config_call, 1)          # ... announced on the config interrupt
    t.join(10)
    assert not t.is_alive() and result == [None]
    assert fake.disk[:4096] == b"r" * 4096 and dev.reconnects == 1


# --- the status machine (virtio_status, shared with vfio-pci) ----------------------------------

def _negotiated(fake: FakeVdpaDevice) -> VhostVdpaTransport:
    t = VhostVdpaConnector(PATH, ops=fake).connect()
    t.negotiate(DRIVER_FEATURES)
    return t


def test_start_refuses_a_device_that_needs_a_reset():
    """DRIVER_OK sticks, but the device raised DEVICE_NEEDS_RESET: the session is no good."""
    fake = make_fake()
    t = _negotiated(fake)
    fake.status |= 64
    with pytest.raises(ConnectError, match=r"did not start \(status 0x4f after DRIVER_OK\)"):
        t.start()
    t.close()
    assert fake._fd == -1 and fake.status == 0


def test_loss_reasons_mean_what_vfio_pcis_do():
    """The same words as the vfio-pci transport's (tests/test_vfio_pci.py) for the same state."""
    fake = make_fake()
    t = _negotiated(fake)
    assert t.loss_reason() is None                     # before DRIVER_OK: nothing is lost
    t.start()
    assert t.loss_reason() is None
    fake.status = 0                                    # reset behind our back
    assert t.loss_reason() == f"vhost-vdpa device {PATH} was reset (status 0x0)"
    fake.status = 0x4F                                 # running, then DEVICE_NEEDS_RESET
    assert t.loss_reason() == (f"vhost-vdpa device {PATH} needs a reset (DEVICE_NEEDS_RESET, "
                               "status 0x4f)")
    fake.status = 0x8F                                 # FAILED: only a driver writes it
    assert t.loss_reason() == f"vhost-vdpa device {PATH} was stopped (FAILED, status 0x8f)"
    fake.status = 0xFF
    assert t.loss_reason() == f"vhost-vdpa device {PATH} reads status 0xff: removed or not " \
                              "responding"
    fake.fail["GET_STATUS"] = errno.EIO
    assert t.loss_reason().startswith(f"cannot read the status of vhost-vdpa device {PATH}: ")
    del fake.fail["GET_STATUS"]
    t.close()
    assert t.loss_reason() == f"the session with vhost-vdpa device {PATH} is closed"


def test_a_reset_that_fails_at_close_still_closes():
    fake = make_fake()
    t = _negotiated(fake)
    t.start()
    fake.fail["SET_STATUS"] = errno.EIO
    t.close()
    assert fake._fd == -1
