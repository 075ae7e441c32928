"""BlockDevice's data path (vblk_core/datapath.py) on the fake back-end of fake_ring_device.py:
what reaches the caller's buffer, how device errors reach the caller, pieces of a large
request, and a broken ring failing the device."""
from __future__ import annotations

import errno
import random

import pytest

import vblk_core
from fake_ring_device import (
    QSD_FEATURES,
    S_IOERR,
    S_UNSUPP,
    Behaviour,
    FakeConfig,
    FakeVhostBackend,
    qsd_like_config,
)
from vblk_core.errors import RequestError
from vblk_core.virtio import VirtioFeature

# --- BlockDevice on the fake back-end: what reaches the caller's buffer -----------------------

@pytest.fixture
def fake_device():
    made = []

    def make(policy=None, raw_hook=None, features=QSD_FEATURES, num_queues=1, **kw):
        disk = bytearray(random.Random(3).randbytes(4 << 20))
        backend = FakeVhostBackend(
            FakeConfig(features, qsd_like_config(len(disk), num_queues), num_queues),
            disk, policy, raw_hook)
        kw.setdefault("request_timeout", 10)
        dev = vblk_core.BlockDevice.open(backend, **kw)
        made.append((dev, backend))
        return dev, backend

    yield make
    for dev, backend in made:
        dev.close()
        backend.stop()
        assert not backend.errors, backend.errors


@pytest.mark.parametrize("event_idx", [True, False])
def test_fake_backend_round_trip(fake_device, event_idx):
    features = QSD_FEATURES if event_idx else QSD_FEATURES & ~VirtioFeature.EVENT_IDX
    dev, backend = fake_device(features=features, num_queues=2, queue_size=8,
                               bounce_buffer_size=8192, bounce_buffers=4)
    assert dev.num_queues == 2
    data = random.Random(9).randbytes(64 << 10)
    dev.pwrite(data, 4096)
    assert backend.disk[4096:4096 + len(data)] == data
    buf = bytearray(len(data) + 1024)
    dev.pread(buf, 3072)
    assert bytes(buf) == bytes(backend.disk[3072:3072 + len(buf)])
    assert dev.get_id() == b"fake-blk"
    assert dev.stats()["totals"]["requests"] >= 2 * (64 << 10) // 8192


def test_short_read_never_reaches_callers_buffer(fake_device):
    # The device fills the whole data buffer but reports only 100 bytes.
    dev, _ = fake_device(policy=lambda r: Behaviour(used_len=101, data_fill=0xEE)
                         if r.type == 0 else None)
    buf = bytearray(b"\x5A" * 8192)
    with pytest.raises(RequestError, match="short read") as info:
        dev.pread(buf, 0)
    assert info.value.errno == errno.EIO
    assert buf == b"\x5A" * 8192


def test_failed_chunk_of_a_large_read_is_not_copied(fake_device):
    # 4 chunks of 8 KiB; the third (sector 32) is short.
    def policy(r):
        if r.type == 0 and r.sector == 32:
            return Behaviour(used_len=1, data_fill=0xEE)
        return None
    dev, backend = fake_device(policy=policy, bounce_buffer_size=8192, bounce_buffers=2)
    buf = bytearray(b"\x5A" * 32768)
    with pytest.raises(RequestError) as info:
        dev.pread(buf, 0)
    assert info.value.errno == errno.EIO
    assert buf[16384:24576] == b"\x5A" * 8192
    # chunks the device did report may have been copied, and then hold the disk's bytes
    for start in (0, 8192, 24576):
        chunk = bytes(buf[start:start + 8192])
        assert chunk in (b"\x5A" * 8192, bytes(backend.disk[start:start + 8192]))


@pytest.mark.parametrize("status,err", [(S_IOERR, errno.EIO), (S_UNSUPP, errno.EOPNOTSUPP),
                                        (9, errno.EPROTO)])
def test_device_status_reaches_caller(fake_device, status, err):
    dev, _ = fake_device(policy=lambda r: Behaviour(status=status, data_fill=0xEE))
    buf = bytearray(4096)
    with pytest.raises(RequestError) as info:
        dev.pread(buf, 0)
    assert info.value.errno == err and buf == bytes(4096)
    for op in (lambda: dev.pwrite(b"x" * 512, 0), dev.flush, lambda: dev.discard(0, 4096),
               lambda: dev.write_zeroes(0, 4096)):
        with pytest.raises(RequestError) as info:
            op()
        assert info.value.errno == err


def test_unwritten_status_on_write_is_an_error(fake_device):
    dev, backend = fake_device(policy=lambda r: Behaviour(write_status=False)
                               if r.type == 1 else None)
    dev.flush()  # other requests fine
    with pytest.raises(RequestError) as info:
        dev.pwrite(b"\x01" * 4096, 0)
    assert info.value.errno == errno.EPROTO


def test_broken_ring_fails_the_device(fake_device):
    def hook(queue, ring, chain):
        if chain.descs[0].len == 16 and len(chain.descs) == 3:
            ring.push(ring.size + 3, 0)  # an id outside the queue
            return True
        return False
    dev, _ = fake_device(raw_hook=hook, queue_size=8)
    dev.flush()
    with pytest.raises(RequestError) as info:
        dev.pread(bytearray(512), 0)
    assert info.value.errno == errno.EIO
    assert dev.state is vblk_core.DeviceState.FAILED
    assert "virtqueue protocol" in dev.failure
    with pytest.raises(RequestError):
        dev.flush()
