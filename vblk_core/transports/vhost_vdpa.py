"""vhost-vdpa transport: a virtio-blk device behind /dev/vhost-vdpa-N, driven with the vhost
ioctls of linux/vhost.h (and a DPU's hardware, or a software device such as a VDUSE export).

One session is one open of the character device:

    open -> SET_OWNER -> reset (status 0) -> ACKNOWLEDGE|DRIVER -> features -> FEATURES_OK
         -> config -> IOTLB update (our memfd at an IOVA) -> vrings -> DRIVER_OK ... -> reset, close

The status steps are virtio_status's; this module supplies their primitives (GET/SET_STATUS,
GET/SET_FEATURES) and everything vhost-specific.

Memory reaches the device through IOTLB messages (struct vhost_msg_v2) written to the fd; the
device then sees the region at an IOVA we choose inside the device's valid range.  Reconnecting
means opening and resetting the same device again.  Every ioctl failure is a ConnectError (or
TransportError once running) naming the ioctl and, where there is one, the fix.
"""
from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable
from typing import Protocol

from ..errors import ConnectError, DeviceError, TransportError
from ..eventfd import EventfdKicker, eventfd_clear_holding_gil
from ..transport import Kicker, MemoryMap, Transport
from ..virtio import VIRTIO_ID_BLOCK, VirtioFeature
from .ioctl import IOC_NONE, IOC_READ, IOC_WRITE, OsFileOps, call, failure, ioc, name_ioctls
from .virtio_status import VirtioStatus

VHOST_VIRTIO = 0xAF   # the ioctl type of linux/vhost.h
VHOST_GET_FEATURES = ioc(IOC_READ, VHOST_VIRTIO, 0x00, 8)
VHOST_SET_FEATURES = ioc(IOC_WRITE, VHOST_VIRTIO, 0x00, 8)
VHOST_SET_OWNER = ioc(IOC_NONE, VHOST_VIRTIO, 0x01, 0)
VHOST_SET_VRING_NUM = ioc(IOC_WRITE, VHOST_VIRTIO, 0x10, 8)
VHOST_SET_VRING_ADDR = ioc(IOC_WRITE, VHOST_VIRTIO, 0x11, 40)
VHOST_SET_VRING_BASE = ioc(IOC_WRITE, VHOST_VIRTIO, 0x12, 8)
VHOST_SET_VRING_KICK = ioc(IOC_WRITE, VHOST_VIRTIO, 0x20, 8)
VHOST_SET_VRING_CALL = ioc(IOC_WRITE, VHOST_VIRTIO, 0x21, 8)
VHOST_SET_BACKEND_FEATURES = ioc(IOC_WRITE, VHOST_VIRTIO, 0x25, 8)
VHOST_GET_BACKEND_FEATURES = ioc(IOC_READ, VHOST_VIRTIO, 0x26, 8)
VHOST_VDPA_GET_DEVICE_ID = ioc(IOC_READ, VHOST_VIRTIO, 0x70, 4)
VHOST_VDPA_GET_STATUS = ioc(IOC_READ, VHOST_VIRTIO, 0x71, 1)
VHOST_VDPA_SET_STATUS = ioc(IOC_WRITE, VHOST_VIRTIO, 0x72, 1)
VHOST_VDPA_GET_CONFIG = ioc(IOC_READ, VHOST_VIRTIO, 0x73, 8)
VHOST_VDPA_SET_VRING_ENABLE = ioc(IOC_WRITE, VHOST_VIRTIO, 0x75, 8)
VHOST_VDPA_GET_VRING_NUM = ioc(IOC_READ, VHOST_VIRTIO, 0x76, 2)
VHOST_VDPA_SET_CONFIG_CALL = ioc(IOC_WRITE, VHOST_VIRTIO, 0x77, 4)
VHOST_VDPA_GET_IOVA_RANGE = ioc(IOC_READ, VHOST_VIRTIO, 0x78, 16)
VHOST_VDPA_GET_CONFIG_SIZE = ioc(IOC_READ, VHOST_VIRTIO, 0x79, 4)
VHOST_VDPA_GET_VQS_COUNT = ioc(IOC_READ, VHOST_VIRTIO, 0x80, 4)
name_ioctls(globals(), "VHOST_")

# Backend feature bits (bit numbers, vhost_types.h).
VHOST_BACKEND_F_IOTLB_MSG_V2 = 1
VHOST_BACKEND_F_IOTLB_BATCH = 2

VHOST_IOTLB_MSG_V2 = 0x2
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_BATCH_BEGIN = 5
VHOST_IOTLB_BATCH_END = 6
VHOST_ACCESS_RW = 0x3

_U64 = struct.Struct("=Q")
_U32 = struct.Struct("=I")
_U16 = struct.Struct("=H")
_VRING_STATE = struct.Struct("=II")      # index, num  (also vhost_vring_file: index, fd)
_VRING_ADDR = struct.Struct("=IIQQQQ")   # index, flags, desc, used, avail, log
_IOVA_RANGE = struct.Struct("=QQ")
_CONFIG_HEADER = struct.Struct("=II")    # off, len; then len bytes
#: struct vhost_msg_v2: type, asid, then the iotlb message in a 64-byte union (72 bytes).
_MSG_V2 = struct.Struct("=II QQQBB 38x")
assert _MSG_V2.size == 72

MAX_CONFIG_SIZE = 4096


class DeviceOps(Protocol):
    """The system calls the transport makes on the device file (replaced in unit tests)."""

    def open(self, path: str) -> int: ...

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int: ...

    def write(self, fd: int, data: bytes) -> int: ...

    def close(self, fd: int) -> None: ...


class OsDeviceOps(OsFileOps):
    """The real thing: OsFileOps's open, ioctl and close, and os.write."""

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)


_FIXES = {
    errno.ENOENT: "no such device: list them with `vdpa dev show` and `ls /dev/vhost-vdpa-*` "
                  "(the vhost_vdpa module must be loaded and the device bound to it)",
    errno.EACCES: "permission denied: run as root or give your user access to the device",
    errno.EPERM: "operation not permitted: run as root (or with CAP_SYS_ADMIN)",
    errno.EBUSY: "the device is busy: another process (a VM, another nbdkit) has it open",
    errno.ENOTTY: "not a vhost-vdpa device: give the /dev/vhost-vdpa-N character device",
    errno.EINVAL: "the device rejected the request",
}


class StatusIoctls:
    """The status register and feature words of an open vhost-vdpa device, one ioctl each
    (virtio_status.StatusRegisters); ``ioctl`` raises a TransportError if one fails."""

    def __init__(self, ioctl: Callable[[int, bytearray], None]) -> None:
        self._ioctl = ioctl

    @property
    def status(self) -> int:
        buf = bytearray(1)
        self._ioctl(VHOST_VDPA_GET_STATUS, buf)
        return buf[0]

    @status.setter
    def status(self, value: int) -> None:
        self._ioctl(VHOST_VDPA_SET_STATUS, bytearray([value]))

    def device_features(self) -> int:
        buf = bytearray(_U64.size)
        self._ioctl(VHOST_GET_FEATURES, buf)
        features: int = _U64.unpack(buf)[0]
        return features

    def set_driver_features(self, features: int) -> None:
        self._ioctl(VHOST_SET_FEATURES, bytearray(_U64.pack(features)))


class VhostVdpaConnector:
    """Opens /dev/vhost-vdpa-N; every reconnect opens and resets it again.  ``timeout``
    bounds the device's reset."""

    def __init__(self, path: str, ops: DeviceOps | None = None, *,
                 timeout: float = 5.0) -> None:
        self.path = path
        self.ops = ops or OsDeviceOps()
        self.timeout = timeout
        self.target = VhostVdpaTransport.describe(path)

    def connect(self) -> VhostVdpaTransport:
        return VhostVdpaTransport(self.path, self.ops, timeout=self.timeout)


class VhostVdpaTransport(Transport):
    """One open of a vhost-vdpa device (a Transport)."""

    def __init__(self, path: str, ops: DeviceOps | None = None, *,
                 timeout: float = 5.0) -> None:
        """Open the device, take ownership, check it is a block device, reset it (waiting
        at most ``timeout`` seconds), ACKNOWLEDGE|DRIVER.  Raises ConnectError naming the
        ioctl and the fix."""
        self.path = path
        self.target = self.describe(path)
        self.ops = ops or OsDeviceOps()
        self.timeout = timeout
        self._fd = -1
        self._status = VirtioStatus(StatusIoctls(self._ioctl), self.target)
        self._eventfds: list[int] = []
        self._mapped: tuple[int, int] | None = None   # (iova, size)
        self._backend_features = 0
        try:
            self._fd = self.ops.open(path)
        except OSError as e:
            raise failure(self.target, "open", e, _FIXES) from None
        try:
            self._ioctl(VHOST_SET_OWNER, 0)
            device_id = _U32.unpack(self._get(VHOST_VDPA_GET_DEVICE_ID, 4))[0]
            if device_id != VIRTIO_ID_BLOCK:
                raise ConnectError(f"{self.target} is not a block device (virtio device id "
                                   f"{device_id}, a block device is {VIRTIO_ID_BLOCK})",
                                   errno.ENODEV)
            self._status.reset(timeout)
            self._status.acknowledge()
            self._negotiate_backend()
            self._vqs: int = _U32.unpack(self._get(VHOST_VDPA_GET_VQS_COUNT, 4))[0]
            self._vring_num: int = _U16.unpack(self._get(VHOST_VDPA_GET_VRING_NUM, 2))[0]
            first, last = _IOVA_RANGE.unpack(self._get(VHOST_VDPA_GET_IOVA_RANGE, 16))
            self._iova_range = (first, last)
            self._config_call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(self._config_call)
            self._ioctl(VHOST_VDPA_SET_CONFIG_CALL, bytearray(_U32.pack(self._config_call)))
        except BaseException:
            self.close()
            raise
        if self._vqs < 1:
            self.close()
            raise ConnectError(f"{self.target} reports {self._vqs} virtqueues")
        if self._iova_range[0] > self._iova_range[1]:
            self.close()
            raise ConnectError(f"{self.target} reports an empty IOVA range "
                               f"[{self._iova_range[0]:#x}, {self._iova_range[1]:#x}]")

    @staticmethod
    def describe(path: str) -> str:
        """How messages name the device at ``path`` (the transport's and its connector's
        ``target``)."""
        return f"vhost-vdpa device {path}"

    # --- ioctls -----------------------------------------------------------------------------

    def _ioctl(self, request: int, arg: bytearray | int) -> None:
        cls = TransportError if self._status.started else ConnectError
        call(self.ops, self._fd, request, arg, self.target, _FIXES, cls)

    def _get(self, request: int, size: int) -> bytearray:
        buf = bytearray(size)
        self._ioctl(request, buf)
        return buf

    def _negotiate_backend(self) -> None:
        offered = _U64.unpack(self._get(VHOST_GET_BACKEND_FEATURES, 8))[0]
        if not offered >> VHOST_BACKEND_F_IOTLB_MSG_V2 & 1:
            raise ConnectError(f"{self.target} does not accept IOTLB_MSG_V2 memory messages "
                               f"(backend features {offered:#x}): kernel too old?")
        wanted = (1 << VHOST_BACKEND_F_IOTLB_MSG_V2) | (1 << VHOST_BACKEND_F_IOTLB_BATCH)
        self._backend_features = offered & wanted
        self._ioctl(VHOST_SET_BACKEND_FEATURES, bytearray(_U64.pack(self._backend_features)))

    # --- the Transport interface --------------------------------------------------------------

    def negotiate(self, driver_features: int) -> int:
        # ACCESS_PLATFORM, when offered: the device's DMA goes through the IOTLB we program.
        return self._status.negotiate(driver_features, VirtioFeature.ACCESS_PLATFORM)

    @property
    def max_queues(self) -> int:
        return self._vqs

    @property
    def max_queue_size(self) -> int:
        return self._vring_num

    def read_config(self, size: int) -> bytes:
        available = _U32.unpack(self._get(VHOST_VDPA_GET_CONFIG_SIZE, 4))[0]
        if available > MAX_CONFIG_SIZE:
            raise DeviceError(f"{self.target} reports a config space of {available} bytes")
        size = min(size, available)
        buf = bytearray(_CONFIG_HEADER.pack(0, size) + bytes(size))
        self._ioctl(VHOST_VDPA_GET_CONFIG, buf)
        return bytes(buf[_CONFIG_HEADER.size:])

    def map_memory(self, memory: MemoryMap) -> int:
        first, last = self._iova_range
        # Our user address as the IOVA when the device allows it (as vhost-user does), else
        # the start of its range: either way the same on every reconnect.
        iova = memory.user_addr
        if iova < first or iova + memory.size - 1 > last:
            iova = -(-first // 4096) * 4096
            if iova + memory.size - 1 > last:
                raise ConnectError(f"{self.target}: the shared memory ({memory.size} bytes) "
                                   f"does not fit its IOVA range [{first:#x}, {last:#x}]")
        batch = bool(self._backend_features >> VHOST_BACKEND_F_IOTLB_BATCH & 1)
        if batch:
            self._iotlb(VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0)
        self._iotlb(VHOST_IOTLB_UPDATE, iova, memory.size, memory.user_addr)
        if batch:
            self._iotlb(VHOST_IOTLB_BATCH_END, 0, 0, 0)
        self._mapped = (iova, memory.size)
        return iova

    def _iotlb(self, kind: int, iova: int, size: int, uaddr: int) -> None:
        msg = _MSG_V2.pack(VHOST_IOTLB_MSG_V2, 0, iova, size, uaddr, VHOST_ACCESS_RW, kind)
        try:
            written = self.ops.write(self._fd, msg)
        except OSError as e:
            raise failure(self.target, f"IOTLB message {kind}", e, _FIXES) from None
        if written != len(msg):
            raise ConnectError(f"{self.target}: IOTLB message {kind}: short write "
                               f"({written} of {len(msg)} bytes)")

    def setup_queue(self, index: int, size: int, desc_addr: int, avail_addr: int,
                    used_addr: int, call_fd: int) -> Kicker:
        if index >= self._vqs:
            raise ConnectError(f"{self.target} has {self._vqs} virtqueues, not {index + 1}")
        if size > self._vring_num:
            raise ConnectError(f"{self.target} accepts rings of up to {self._vring_num} "
                               f"entries, not {size}: use queue-size={self._vring_num} or less")
        kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._eventfds.append(kick_fd)
        self._ioctl(VHOST_SET_VRING_NUM, bytearray(_VRING_STATE.pack(index, size)))
        self._ioctl(VHOST_SET_VRING_BASE, bytearray(_VRING_STATE.pack(index, 0)))
        self._ioctl(VHOST_SET_VRING_ADDR, bytearray(
            _VRING_ADDR.pack(index, 0, desc_addr, used_addr, avail_addr, 0)))
        self._ioctl(VHOST_SET_VRING_KICK, bytearray(_VRING_STATE.pack(index, kick_fd)))
        self._ioctl(VHOST_SET_VRING_CALL, bytearray(_VRING_STATE.pack(index, call_fd)))
        self._ioctl(VHOST_VDPA_SET_VRING_ENABLE, bytearray(_VRING_STATE.pack(index, 1)))
        return EventfdKicker(kick_fd)

    def start(self) -> None:
        self._status.start()

    def loss_fd(self) -> int:
        # The config interrupt: a device that needs a reset says so with a config change.
        return self._config_call if self._fd >= 0 else -1

    def loss_reason(self) -> str | None:
        if self._fd < 0:
            return f"the session with {self.target} is closed"
        eventfd_clear_holding_gil(self._config_call)
        return self._status.loss_reason()

    def close(self) -> None:
        """Reset the device, drop the mapping, close everything (idempotent, never raises)."""
        if self._fd >= 0:
            for action in (self._close_reset, self._close_unmap):
                try:
                    action()
                except (OSError, TransportError):
                    pass
            fd, self._fd = self._fd, -1
            try:
                self.ops.close(fd)
            except OSError:
                pass
        for efd in self._eventfds:
            os.close(efd)
        self._eventfds.clear()

    def _close_reset(self) -> None:
        self._status.reset(min(self.timeout, 1.0))

    def _close_unmap(self) -> None:
        if self._mapped is not None:
            iova, size = self._mapped
            self._mapped = None
            self.ops.write(self._fd, _MSG_V2.pack(VHOST_IOTLB_MSG_V2, 0, iova, size, 0, 0,
                                                  VHOST_IOTLB_INVALIDATE))
