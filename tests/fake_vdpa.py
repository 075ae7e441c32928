"""A fake /dev/vhost-vdpa-N for unit tests: the system-call surface of
vblk_core.transports.vhost_vdpa (``DeviceOps``: open, ioctl, write, close), behaving as
drivers/vhost/vdpa.c does where the driver depends on it; the device behind it is
fake_blk's BlkDevice (this class is one), serving the rings once DRIVER_OK.

Written from linux/vhost.h and the kernel's documented behaviour, independently of the driver:
ioctl numbers are computed here, not imported.  Knobs: ``fail`` (ioctl name -> errno),
``open_errno``, ``device_id``, ``features``, ``backend_features``, ``vqs``, ``vring_num``,
``iova_range``, ``features_ok_sticks``, ``driver_ok_sticks``, ``short_iotlb_write``.

``backing_fd(iova)`` is the VDUSE side: the file a VDUSE daemon gets for a mapping from
VDUSE_IOTLB_GET_FD (the kernel hands it the file behind the user address we registered).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading

from fake_blk import BlkDevice
from fake_ring import FakeRing
from fake_ring_device import BlkEmulator, serve_queue


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | 0xAF << 8 | nr


IOCTLS = {
    _ioc(2, 0x00, 8): "GET_FEATURES", _ioc(1, 0x00, 8): "SET_FEATURES",
    _ioc(0, 0x01, 0): "SET_OWNER", _ioc(1, 0x10, 8): "SET_VRING_NUM",
    _ioc(1, 0x11, 40): "SET_VRING_ADDR", _ioc(1, 0x12, 8): "SET_VRING_BASE",
    _ioc(1, 0x20, 8): "SET_VRING_KICK", _ioc(1, 0x21, 8): "SET_VRING_CALL",
    _ioc(1, 0x25, 8): "SET_BACKEND_FEATURES", _ioc(2, 0x26, 8): "GET_BACKEND_FEATURES",
    _ioc(2, 0x70, 4): "GET_DEVICE_ID", _ioc(2, 0x71, 1): "GET_STATUS",
    _ioc(1, 0x72, 1): "SET_STATUS", _ioc(2, 0x73, 8): "GET_CONFIG",
    _ioc(1, 0x75, 8): "SET_VRING_ENABLE", _ioc(2, 0x76, 2): "GET_VRING_NUM",
    _ioc(1, 0x77, 4): "SET_CONFIG_CALL", _ioc(2, 0x78, 16): "GET_IOVA_RANGE",
    _ioc(2, 0x79, 4): "GET_CONFIG_SIZE", _ioc(2, 0x80, 4): "GET_VQS_COUNT",
}
MSG_V2 = struct.Struct("=IIQQQBB38x")
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 64
#: What qemu-storage-daemon's VDUSE export offered (vm-facts.md): SEG_MAX BLK_SIZE FLUSH
#: TOPOLOGY MQ DISCARD WRITE_ZEROES NOTIFY_ON_EMPTY INDIRECT EVENT_IDX VERSION_1 ACCESS_PLATFORM
VDUSE_FEATURES = 0x331007644


class FakeVdpaDevice(BlkDevice):
    """One fake vDPA block device (a DeviceOps); ``disk`` is its storage.  The requests, and
what the test sees of them (``policy``, ``raw_hook``, ``served``, ``errors``), are BlkDevice's."""

    def __init__(self, disk: bytearray, config: bytes, *, device_id: int = 2,
                 features: int = VDUSE_FEATURES, backend_features: int = 0xE, vqs: int = 2,
                 vring_num: int = 256, iova_range: tuple[int, int] = (0, (1 << 64) - 1),
                 fail: dict[str, int] | None = None, open_errno: int | None = None,
                 features_ok_sticks: bool = True, driver_ok_sticks: bool = True,
                 short_iotlb_write: bool = False, policy=None) -> None:
        super().__init__(disk, config, features=features, policy=policy)
        self.device_id = device_id
        self.backend_features = backend_features
        self.vqs = vqs
        self.vring_num = vring_num
        self.iova_range = iova_range
        self.fail = dict(fail or {})
        self.open_errno = open_errno
        self.features_ok_sticks = features_ok_sticks
        self.driver_ok_sticks = driver_ok_sticks
        self.short_iotlb_write = short_iotlb_write
        self.calls: list[str] = []          # every ioctl / IOTLB message, in order
        self.status_writes: list[int] = []  # every SET_STATUS value, in order
        self.opens = 0
        self.iotlb: dict[int, tuple[int, int]] = {}   # iova -> (size, uaddr)
        self.negotiated = 0
        self._fd = -1
        self._reset_state()

    def _reset_state(self) -> None:
        for vr in getattr(self, "vrings", {}).values():
            for key in ("call", "kick"):
                if key in vr:
                    os.close(vr.pop(key))
        self.status = 0
        self.vrings: dict[int, dict[str, int]] = {}
        self.config_call = -1

    # --- what a test does to the device --------------------------------------------------

    def need_reset(self) -> None:
        """The device breaks: DEVICE_NEEDS_RESET, announced on the config interrupt."""
        self.status |= NEEDS_RESET
        self._stop_serving()
        if self.config_call >= 0:
            os.eventfd_write(self.config_call, 1)

    # --- DeviceOps -------------------------------------------------------------------------

    def open(self, path: str) -> int:
        if self.open_errno is not None:
            raise OSError(self.open_errno, os.strerror(self.open_errno), path)
        if self._fd >= 0:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        self.opens += 1
        self._fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self._reset_state()
        self._threads: list[threading.Thread] = []
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        return self._fd

    def close(self, fd: int) -> None:
        assert fd == self._fd, "closing an fd that is not the device's"
        self._stop_serving()
        os.close(self._stop)
        os.close(fd)
        self._fd = -1
        self.iotlb.clear()       # the kernel drops the address space with the fd
        self._reset_state()

    def write(self, fd: int, data: bytes) -> int:
        assert fd == self._fd
        mtype, asid, iova, size, uaddr, perm, kind = MSG_V2.unpack(data)
        if mtype != 2 or asid != 0:
            raise OSError(errno.EINVAL, "bad IOTLB message")
        self.calls.append({2: "IOTLB_UPDATE", 3: "IOTLB_INVALIDATE", 5: "IOTLB_BATCH_BEGIN",
                           6: "IOTLB_BATCH_END"}.get(kind, f"IOTLB_{kind}"))
        if kind == 2:
            if perm != 3 or size == 0:
                raise OSError(errno.EINVAL, "bad IOTLB update")
            self.iotlb[iova] = (size, uaddr)
        elif kind == 3:
            self.iotlb.pop(iova, None)
        return len(data) - 8 if self.short_iotlb_write else len(data)

    def ioctl(self, fd: int, request: int, arg) -> int:
        assert fd == self._fd, "ioctl on an fd that is not the device's"
        name = IOCTLS.get(request)
        if name is None:
            raise OSError(errno.ENOTTY, "unknown ioctl")
        self.calls.append(name)
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]))
        handler = getattr(self, "_" + name.lower())
        handler(arg)
        return 0

    # --- ioctls ----------------------------------------------------------------------------

    def _set_owner(self, arg) -> None:
        pass

    def _get_device_id(self, arg) -> None:
        struct.pack_into("=I", arg, 0, self.device_id)

    def _get_backend_features(self, arg) -> None:
        struct.pack_into("=Q", arg, 0, self.backend_features)

    def _set_backend_features(self, arg) -> None:
        (value,) = struct.unpack("=Q", arg)
        if value & ~self.backend_features:
            raise OSError(errno.EOPNOTSUPP, "backend feature not offered")

    def _get_features(self, arg) -> None:
        struct.pack_into("=Q", arg, 0, self.features)

    def _set_features(self, arg) -> None:
        if self.status & FEATURES_OK:
            raise OSError(errno.EBUSY, "features already set")
        (value,) = struct.unpack("=Q", arg)
        self.negotiated = value

    def _get_status(self, arg) -> None:
        arg[0] = self.status

    def _set_status(self, arg) -> None:
        status = arg[0]
        self.status_writes.append(status)
        if status == 0:
            self._stop_serving()
            self._reset_state()
            return
        if self.status & ~status & ~NEEDS_RESET:
            raise OSError(errno.EINVAL, "status bits cannot be cleared without a reset")
        if status & FEATURES_OK and not self.features_ok_sticks:
            status &= ~FEATURES_OK
        if status & DRIVER_OK and not self.status & DRIVER_OK:
            if not self.driver_ok_sticks:
                status &= ~DRIVER_OK
            else:
                self._start_serving()
        self.status = status | (self.status & NEEDS_RESET)

    def _get_config_size(self, arg) -> None:
        struct.pack_into("=I", arg, 0, len(self.config))

    def _get_config(self, arg) -> None:
        off, length = struct.unpack_from("=II", arg)
        if off + length > len(self.config) or len(arg) < 8 + length:
            raise OSError(errno.EINVAL, "config read out of range")
        arg[8:8 + length] = self.config[off:off + length]

    def _get_vqs_count(self, arg) -> None:
        struct.pack_into("=I", arg, 0, self.vqs)

    def _get_vring_num(self, arg) -> None:
        struct.pack_into("=H", arg, 0, self.vring_num)

    def _get_iova_range(self, arg) -> None:
        struct.pack_into("=QQ", arg, 0, *self.iova_range)

    def _set_config_call(self, arg) -> None:
        (self.config_call,) = struct.unpack("=i", arg)

    def _vring(self, index: int) -> dict[str, int]:
        if index >= self.vqs:
            raise OSError(errno.EINVAL, "no such virtqueue")
        return self.vrings.setdefault(index, {})

    def _set_vring_num(self, arg) -> None:
        index, num = struct.unpack("=II", arg)
        if num > self.vring_num or num & (num - 1):
            raise OSError(errno.EINVAL, "bad ring size")
        self._vring(index)["num"] = num

    def _set_vring_base(self, arg) -> None:
        index, base = struct.unpack("=II", arg)
        self._vring(index)["base"] = base

    def _set_vring_addr(self, arg) -> None:
        index, _flags, desc, used, avail, _log = struct.unpack("=IIQQQQ", arg)
        self._vring(index).update(desc=desc, used=used, avail=avail)

    def _set_vring_kick(self, arg) -> None:
        index, fd = struct.unpack("=Ii", arg)
        self._vring(index)["kick"] = os.dup(fd)

    def _set_vring_call(self, arg) -> None:
        index, fd = struct.unpack("=Ii", arg)
        self._vring(index)["call"] = os.dup(fd)

    def _set_vring_enable(self, arg) -> None:
        index, enable = struct.unpack("=II", arg)
        self._vring(index)["enabled"] = enable

    # --- the device side -------------------------------------------------------------------

    def backing_fd(self, iova: int) -> int:
        """A read-write fd of the file that backs the mapping at ``iova``, as
        VDUSE_IOTLB_GET_FD gives it (drivers/vhost/vdpa.c registers the vma's file with a
        VDUSE device).  Found as the kernel does, from the user address: the inode of its
        mapping in /proc/self/maps, reopened through the fd of this process that holds it.
        The caller closes it.  Raises OSError(ENOENT) if no such file is open here."""
        _size, uaddr = self.iotlb[iova]
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, _perms, _off, dev, inode = line.split()[:5]
                start, end = (int(x, 16) for x in span.split("-"))
                if start <= uaddr < end:
                    break
            else:
                raise OSError(errno.ENOENT, f"{uaddr:#x} is not mapped")
        if inode == "0":
            raise OSError(errno.ENOENT, f"{uaddr:#x} is anonymous memory: no file behind it")
        major, minor = (int(x, 16) for x in dev.split(":"))
        want = (int(inode), os.makedev(major, minor))
        for name in os.listdir("/proc/self/fd"):
            try:
                st = os.stat(f"/proc/self/fd/{name}")
                if (st.st_ino, st.st_dev) == want:
                    return os.open(f"/proc/self/fd/{name}", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue    # an fd that closed meanwhile, or one that cannot be reopened
        raise OSError(errno.ENOENT, f"no open file behind {uaddr:#x} (inode {inode})")

    def _translate(self, iova: int, length: int) -> tuple[memoryview, int]:
        """A view of the mapped region holding [iova, iova+length), and that region's iova."""
        for start, (size, uaddr) in self.iotlb.items():
            if start <= iova and iova + length <= start + size:
                raw = (ctypes.c_char * size).from_address(uaddr)
                return memoryview(raw).cast("B"), start
        raise OSError(errno.EFAULT, f"iova {iova:#x} is not mapped")

    def _start_serving(self) -> None:
        self.ack_features(self.negotiated)
        for index, vr in sorted(self.vrings.items()):
            if not vr.get("enabled"):
                continue
            mem, base = self._translate(vr["desc"], 16 * vr["num"])
            ring = FakeRing(mem, vr["num"], vr["desc"] - base, vr["avail"] - base,
                            vr["used"] - base, base)
            t = threading.Thread(target=serve_queue,
                                 args=(BlkEmulator(ring, self, index=index), vr.pop("call"),
                                       vr.pop("kick"), self._stop),
                                 name=f"fake-vdpa-q{index}", daemon=True)
            self._threads.append(t)
            t.start()

    def _stop_serving(self) -> None:
        threads = getattr(self, "_threads", [])
        if not threads:
            return
        os.eventfd_write(self._stop, 1)
        for t in threads:
            t.join(5)
        threads.clear()
        os.eventfd_read(self._stop)
        for vr in self.vrings.values():
            for key in ("call", "kick"):
                if key in vr:
                    os.close(vr.pop(key))
