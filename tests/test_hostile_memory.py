"""A device that holds the shared-memory file cannot change its size: the memfd is sealed
(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) before its fd leaves the process, so a back-end's
ftruncate() gets EPERM instead of making our next access SIGBUS, and I/O goes on.

Three devices try (memory_attack.attack: shrink to 0 and by a page, grow by ftruncate and by
fallocate, add F_SEAL_FUTURE_WRITE):
- the fake vhost-user back-end, on the fd SET_MEM_TABLE gave it, in the middle of the I/O;
- the fake vhost-vdpa device, on the file VDUSE_IOTLB_GET_FD would give a VDUSE daemon;
- a proxy between ``nbdkit python plugin/plugin.py socket=...`` and a real
  qemu-storage-daemon, on the fd it forwarded: then nbdkit must still serve (no SIGBUS), with
  every write checked in the image file.
"""
from __future__ import annotations

import os
import random
import signal

from conftest import need_module
from device_util import open_device
from fake_ring_device import qsd_like_config
from fake_vdpa import FakeVdpaDevice
from fake_vhost_user import FakeVhostUserBlk
from memory_attack import REFUSED, attack, seals
from vblk_core import BlockDevice, DeviceState
from vblk_core.memory import SEALS, SharedRegion
from vblk_core.transports.vhost_vdpa import VhostVdpaConnector
from vblk_tools.patterns import pattern
from vhost_user_proxy import SET_MEM_TABLE, VhostUserProxy

nbd = need_module("nbd", "python3-libnbd")

KiB, MiB = 1 << 10, 1 << 20
DISK = 4 * MiB


def test_the_region_is_sealed_at_its_size_and_stays_writable():
    """The memfd is sealed against shrinking, growing and more seals, not against writes."""
    region = SharedRegion(3 * MiB + 1)
    try:
        assert region.size == 3 * MiB + 4 * KiB
        assert seals(region.fd) == SEALS
        assert attack(region.fd) == REFUSED
        assert os.fstat(region.fd).st_size == region.size
        region.view[-4:] = b"last"                  # the last page is still there
        assert os.pread(region.fd, 4, region.size - 4) == b"last"
        os.pwrite(region.fd, b"dev", 0)             # and the device may write
        assert bytes(region.view[:3]) == b"dev"
    finally:
        region.close()


def _verified_io(dev: BlockDevice, disk: bytearray, rounds: int, seed: int) -> None:
    """``rounds`` 64 KiB writes and reads; each write checked on the device's disk, each read
    against what was written."""
    rng = random.Random(seed)
    for _ in range(rounds):
        offset = rng.randrange(DISK // (64 * KiB)) * 64 * KiB
        data = rng.randbytes(64 * KiB)
        dev.pwrite(data, offset)
        assert disk[offset:offset + len(data)] == data
        back = bytearray(len(data))
        dev.pread(back, offset)
        assert back == data


def test_fake_vhost_user_backend_cannot_resize_the_memory(tmp_path):
    """The fake back-end attacks the memfd it got with SET_MEM_TABLE while serving request 20:
    every attempt is refused (EPERM), the request and everything after it are served."""
    disk = bytearray(pattern(DISK, seed=3))
    fake = FakeVhostUserBlk(tmp_path / "vu.sock", disk, num_queues=2,
                            io_fault="resize_memory", io_fault_at=20).start()
    dev = None
    try:
        dev = open_device(fake.path, bounce_buffer_size=64 * KiB, bounce_buffers=8,
                          request_timeout=5)
        _verified_io(dev, fake.disk, 30, seed=1)           # requests 0..59: 20 is the attack
        assert fake.injected["resize_memory"] == 1
        assert fake.memory_attacks == [REFUSED]
        _verified_io(dev, fake.disk, 20, seed=2)
        assert dev.state is DeviceState.CONNECTED and dev.reconnects == 0
        assert dev.stats()["totals"]["errors"] == 0
        assert fake.violations == []
    finally:
        if dev is not None:
            dev.close()
        fake.stop()


def test_fake_vduse_daemon_cannot_resize_the_memory():
    """What VDUSE_IOTLB_GET_FD hands a VDUSE daemon for our mapping is the sealed memfd: the
    attack is refused and the device goes on serving."""
    disk = bytearray(random.Random(4).randbytes(DISK))
    fake = FakeVdpaDevice(disk, qsd_like_config(DISK, 2))
    dev = BlockDevice.open(VhostVdpaConnector("/dev/vhost-vdpa-7", ops=fake), num_queues=2,
                           bounce_buffer_size=64 * KiB, bounce_buffers=8, request_timeout=5)
    try:
        _verified_io(dev, fake.disk, 10, seed=5)
        ((iova, (size, _uaddr)),) = fake.iotlb.items()
        fd = fake.backing_fd(iova)
        try:
            assert os.fstat(fd).st_size == size
            assert seals(fd) == SEALS
            assert attack(fd) == REFUSED
        finally:
            os.close(fd)
        _verified_io(dev, fake.disk, 10, seed=6)
        assert dev.state is DeviceState.CONNECTED
        assert not fake.errors, fake.errors
    finally:
        dev.close()


def _nbd_io(h, image, rounds: int, seed: int) -> None:
    """``rounds`` 64 KiB NBD writes and reads; every write checked in the image file."""
    rng = random.Random(seed)
    size = h.get_size()
    with open(image, "rb") as f:
        for _ in range(rounds):
            offset = rng.randrange(size // (64 * KiB)) * 64 * KiB
            data = rng.randbytes(64 * KiB)
            h.pwrite(data, offset)
            h.flush()
            assert os.pread(f.fileno(), len(data), offset) == data, f"image at {offset}"
            assert h.pread(len(data), offset) == data


def test_nbdkit_survives_a_backend_that_truncates_the_memory(sockdir, qsd_factory,
                                                             nbdkit_factory):
    """nbdkit's plugin on a real qemu-storage-daemon, through a proxy that keeps the memory
    fd as a back-end gets it: after 200 verified 64 KiB writes and reads the proxy tries to
    truncate it to 0 (and the rest of the attack); each attempt gets EPERM, 200 more verified
    writes and reads succeed, and nbdkit is still running (unsealed, it died of SIGBUS)."""
    qsd = qsd_factory(num_queues=2, size=64 * MiB)
    proxy = VhostUserProxy(sockdir / "proxy.sock", qsd.socket).start()
    try:
        kit = nbdkit_factory([f"socket={proxy.path}", "request-timeout=10",
                              "reconnect-timeout=0"])
        h = kit.connect()
        try:
            _nbd_io(h, qsd.image, 200, seed=7)
            (fd,) = proxy.memory_fds()
            assert seals(fd) == SEALS
            before = os.fstat(fd).st_size
            assert attack(fd) == REFUSED
            assert os.fstat(fd).st_size == before
            _nbd_io(h, qsd.image, 200, seed=8)
        finally:
            h.shutdown()
        assert kit.running, f"nbdkit exited ({kit.proc and kit.proc.returncode})"
        assert proxy.messages[SET_MEM_TABLE] == 1
        status = kit.stop().status
        assert status == 0, (status, signal.Signals(-status).name if status and status < 0
                              else "", kit.log_text())
    finally:
        proxy.stop()
