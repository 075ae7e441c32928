"""The VFIO user-space API (linux/vfio.h) for one PCI function: container, group, device.

``VfioDevice.open`` does the steps of the kernel's vfio.rst in order, each failure a
ConnectError naming the step and the fix:

    sysfs: ADDR exists, has an IOMMU group, is bound to vfio-pci
    /dev/vfio/vfio: GET_API_VERSION, CHECK_EXTENSION(TYPE1v2 or TYPE1)
    /dev/vfio/N: GROUP_GET_STATUS (viable), GROUP_SET_CONTAINER, SET_IOMMU, IOMMU_GET_INFO
    GROUP_GET_DEVICE_FD(ADDR): DEVICE_GET_INFO, GET_REGION_INFO (BARs, config), GET_IRQ_INFO

The system calls go through a ``VfioOps`` (``OsVfioOps`` for real) so that unit tests can put
a fake device behind them.  Struct layouts and ioctl numbers follow the uapi header: every
ioctl is _IO(';', 100 + n), and every struct starts with ``argsz``.
"""
from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError, ConnectError
from .ioctl import IOC_NONE, OsFileOps, call, failure, ioc, name_ioctls


def _io(n: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + n): every VFIO ioctl."""
    return ioc(IOC_NONE, ord(";"), 100 + n, 0)


VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)
name_ioctls(globals(), "VFIO_")

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1
VFIO_IRQ_INFO_EVENTFD = 1
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4

GROUP_STATUS = struct.Struct("=II")            # argsz, flags
DEVICE_INFO = struct.Struct("=IIIII")          # argsz, flags, num_regions, num_irqs, cap_offset
REGION_INFO = struct.Struct("=IIIIQQ")         # argsz, flags, index, cap_offset, size, offset
IRQ_INFO = struct.Struct("=IIII")              # argsz, flags, index, count
IRQ_SET = struct.Struct("=IIIII")              # argsz, flags, index, start, count; then data
IOMMU_INFO = struct.Struct("=IIQII")           # argsz, flags, iova_pgsizes, cap_offset, pad
DMA_MAP = struct.Struct("=IIQQQ")              # argsz, flags, vaddr, iova, size
DMA_UNMAP = struct.Struct("=IIQQ")             # argsz, flags, iova, size
CAP_HEADER = struct.Struct("=HHI")             # id, version, next
CAP_COUNT = struct.Struct("=II")               # nr_iovas / nr_areas, reserved
RANGE = struct.Struct("=QQ")                   # iova start, end / area offset, size
MAX_INFO_SIZE = 1 << 16

Buffer = mmap.mmap | bytearray


#: domain (4 to 8 hex digits, as sysfs names it; optional), bus, device (0-1f), function.
_ADDRESS = re.compile(r"(?:([0-9a-f]{4,8}):)?([0-9a-f]{2}):([01][0-9a-f])\.([0-7])")


def normalize_pci_address(address: str, key: str = "") -> str:
    """The sysfs name of a PCI function ("0000:00:04.0") from "0000:00:04.0" or "00:04.0"
    (any case, nothing around it): the one rule for the plugin's pci= and this transport.
    Raises ConfigError (naming ``key``=, if given) otherwise."""
    m = _ADDRESS.fullmatch(address.lower())
    if not m:
        name = f"{key}=" if key else ""
        raise ConfigError(f"{name}{address!r} is not a PCI address: give domain:bus:slot."
                          f"function as lspci -D prints it, e.g. {name}0000:00:04.0")
    return f"{m[1] or '0000'}:{m[2]}:{m[3]}.{m[4]}"


class VfioOps(Protocol):
    """The system calls made on VFIO files (a fake device replaces them in unit tests).
    ``sysfs_root`` is where sysfs is mounted ("/sys"); device files are opened by path."""

    sysfs_root: str

    def open(self, path: str) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int: ...

    def mmap(self, fd: int, length: int, offset: int) -> Buffer: ...

    def munmap(self, buf: Buffer) -> None: ...

    def pread(self, fd: int, length: int, offset: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...


class OsVfioOps(OsFileOps):
    """The real system calls: OsFileOps's open, ioctl and close, and mmap, pread, pwrite."""

    def __init__(self, sysfs_root: str = "/sys") -> None:
        self.sysfs_root = sysfs_root

    def mmap(self, fd: int, length: int, offset: int) -> Buffer:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=offset)

    def munmap(self, buf: Buffer) -> None:
        if isinstance(buf, mmap.mmap):
            buf.close()

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        return os.pread(fd, length, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)


@dataclass(frozen=True)
class Region:
    """One device region (a BAR, the config space): where it is in the device fd, how big,
    and the parts that can be mmapped ((offset, size) within the region)."""
    index: int
    flags: int
    size: int
    offset: int
    mmap_areas: tuple[tuple[int, int], ...]


def iter_caps(buf: bytes | bytearray, first: int) -> list[tuple[int, int]]:
    """(id, offset) of each capability in a VFIO info chain starting at ``first``."""
    caps: list[tuple[int, int]] = []
    off = first
    while off and len(caps) < 64 and off + CAP_HEADER.size <= len(buf):
        cap_id, _version, nxt = CAP_HEADER.unpack_from(buf, off)
        caps.append((cap_id, off))
        off = nxt if nxt > off else 0
    return caps


def _ranges(buf: bytes | bytearray, off: int) -> list[tuple[int, int]]:
    count = CAP_COUNT.unpack_from(buf, off + CAP_HEADER.size)[0]
    base = off + CAP_HEADER.size + CAP_COUNT.size
    count = min(count, (len(buf) - base) // RANGE.size)
    return [RANGE.unpack_from(buf, base + i * RANGE.size) for i in range(count)]


def _link_name(path: str) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _bind_howto(addr: str, sysfs: str, bound: bool) -> str:
    dev = f"{sysfs}/bus/pci/devices/{addr}"
    unbind = f"echo {addr} > {dev}/driver/unbind; " if bound else ""
    return (f"bind it to vfio-pci: modprobe vfio-pci; {unbind}echo vfio-pci > "
            f"{dev}/driver_override; echo {addr} > {sysfs}/bus/pci/drivers_probe")


class VfioDevice:
    """An opened VFIO PCI function: container, group and device fds, regions, IOMMU info."""

    def __init__(self, addr: str, ops: VfioOps, target: str) -> None:
        self.addr = addr
        self.ops = ops
        self.target = target
        self.container = self.group_fd = self.fd = -1
        self.group = ""
        self.iommu_type = VFIO_TYPE1v2_IOMMU
        self.iova_pgsizes = 0
        self.iova_ranges: list[tuple[int, int]] = []
        self.regions: dict[int, Region] = {}
        self.irq_counts: dict[int, int] = {}

    # --- helpers ----------------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: bytearray | int,
              fixes: dict[int, str] | None = None) -> int:
        """``ioctl.call`` on this device: ConnectError naming the request if it fails."""
        return call(self.ops, fd, request, arg, self.target, fixes)

    def _info(self, fd: int, request: int, head: bytes, size: int) -> bytearray:
        """An *_INFO ioctl, grown once if the kernel says its capabilities need more room."""
        buf = bytearray(head) + bytes(size - len(head))
        struct.pack_into("=I", buf, 0, size)
        self.ioctl(fd, request, buf)
        needed = struct.unpack_from("=I", buf)[0]
        if size < needed <= MAX_INFO_SIZE:
            return self._info(fd, request, head, needed)
        return buf

    # --- opening ----------------------------------------------------------------------------

    def open(self) -> None:
        """Every step up to the device fd and its regions.  Raises ConnectError."""
        sysfs = self.ops.sysfs_root
        dev = f"{sysfs}/bus/pci/devices/{self.addr}"
        if not os.path.exists(dev):
            raise ConnectError(f"no PCI device {self.addr}: check lspci -D (addresses are "
                               "DDDD:BB:DD.F)", errno.ENODEV)
        group = _link_name(f"{dev}/iommu_group")
        if group is None:
            raise ConnectError(
                f"{self.target} has no IOMMU group: enable the IOMMU (intel_iommu=on or "
                "amd_iommu=on on the kernel command line; a QEMU guest needs -device "
                "intel-iommu,intremap=on,caching-mode=on); vfio's noiommu mode cannot work "
                "here: the device's DMA must go through the IOMMU", errno.ENODEV)
        self.group = group
        try:
            with open(f"{sysfs}/kernel/iommu_groups/{group}/name") as f:
                noiommu = f.read().strip() == "vfio-noiommu"
        except OSError:
            noiommu = False
        if noiommu:
            raise ConnectError(f"{self.target} is in a vfio noiommu group: the device's DMA "
                               "must go through an IOMMU (enable intel_iommu=on / amd_iommu=on)",
                               errno.ENODEV)
        driver = _link_name(f"{dev}/driver")
        if driver != "vfio-pci":
            now = f"bound to {driver}" if driver else "bound to no driver"
            raise ConnectError(f"{self.target} is {now}, not vfio-pci: "
                               f"{_bind_howto(self.addr, sysfs, bool(driver))}", errno.ENODEV)
        self._open_container()
        self._open_group()
        self._open_device()

    def _open_file(self, path: str) -> int:
        try:
            return self.ops.open(path)
        except OSError as e:
            raise failure(self.target, f"opening {path}", e, {
                errno.EACCES: "permission denied: run as root, or chown the file to the user "
                              "(and raise its locked-memory limit, ulimit -l)",
                errno.EPERM: "permission denied: run as root",
                errno.EBUSY: "the group is busy: another process (a VM, another vblk), or "
                             "another session in this one, has it open",
                errno.ENOENT: "load vfio-pci (modprobe vfio-pci) and check that udev created "
                              "the file"}) from None

    def _open_container(self) -> None:
        self.container = self._open_file("/dev/vfio/vfio")
        version = self.ioctl(self.container, VFIO_GET_API_VERSION, 0)
        if version != VFIO_API_VERSION:
            raise ConnectError(f"{self.target}: VFIO API version {version}, expected "
                               f"{VFIO_API_VERSION}", errno.ENOTSUP)
        for kind in (VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU):
            if self.ioctl(self.container, VFIO_CHECK_EXTENSION, kind) > 0:
                self.iommu_type = kind
                return
        raise ConnectError(f"{self.target}: the VFIO container supports no type1 IOMMU: "
                           "modprobe vfio_iommu_type1", errno.ENOTSUP)

    def _open_group(self) -> None:
        self.group_fd = self._open_file(f"/dev/vfio/{self.group}")
        status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
        self.ioctl(self.group_fd, VFIO_GROUP_GET_STATUS, status)
        if not GROUP_STATUS.unpack(status)[1] & VFIO_GROUP_FLAGS_VIABLE:
            raise ConnectError(self._not_viable(), errno.EBUSY)
        self.ioctl(self.group_fd, VFIO_GROUP_SET_CONTAINER,
                   bytearray(struct.pack("=i", self.container)))
        self.ioctl(self.container, VFIO_SET_IOMMU, self.iommu_type, {
            errno.EPERM: "no interrupt remapping: the IOMMU must remap interrupts (QEMU: "
                         "-device intel-iommu,intremap=on; on hardware enable it in the "
                         "firmware), or at your own risk load vfio_iommu_type1 with "
                         "allow_unsafe_interrupts=1"})
        info = self._info(self.container, VFIO_IOMMU_GET_INFO,
                          IOMMU_INFO.pack(0, 0, 0, 0, 0), 4096)
        _argsz, flags, self.iova_pgsizes, cap_offset, _pad = IOMMU_INFO.unpack_from(info)
        for cap_id, off in iter_caps(info, cap_offset if flags & VFIO_IOMMU_INFO_CAPS else 0):
            if cap_id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                self.iova_ranges = sorted(r for r in _ranges(info, off) if r[0] <= r[1])
        if not self.iova_ranges:   # kernels before 5.4 report none: all of a 48-bit space
            self.iova_ranges = [(0, (1 << 48) - 1)]

    def _not_viable(self) -> str:
        path = f"{self.ops.sysfs_root}/kernel/iommu_groups/{self.group}/devices"
        try:
            members = sorted(os.listdir(path))
        except OSError:
            members = []
        others = []
        for member in members:
            driver = _link_name(f"{path}/{member}/driver")
            if member != self.addr and driver != "vfio-pci":
                others.append(f"{member} (bound to {driver or 'no driver'})")
        who = ", ".join(others) or "see " + path
        return (f"{self.target}: IOMMU group {self.group} is not viable: every device in it must "
                f"be bound to vfio-pci (or to no driver); the others are: {who}")

    def _open_device(self) -> None:
        name = bytearray(self.addr.encode() + b"\0")
        self.fd = self.ioctl(self.group_fd, VFIO_GROUP_GET_DEVICE_FD, name, {
            errno.EBUSY: "the device is busy: another process (or session) has it open"})
        if self.fd < 0:
            raise ConnectError(f"{self.target}: VFIO_GROUP_GET_DEVICE_FD returned {self.fd}")
        info = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0, 0))
        self.ioctl(self.fd, VFIO_DEVICE_GET_INFO, info)
        _argsz, flags, num_regions, num_irqs, _cap = DEVICE_INFO.unpack(info)
        if not flags & VFIO_DEVICE_FLAGS_PCI or num_regions <= VFIO_PCI_CONFIG_REGION_INDEX:
            raise ConnectError(f"{self.target} is not a VFIO PCI device (flags {flags:#x}, "
                               f"{num_regions} regions)", errno.ENODEV)
        for index in (*range(6), VFIO_PCI_CONFIG_REGION_INDEX):
            self.regions[index] = self._region(index)
        for index in (VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_ERR_IRQ_INDEX, VFIO_PCI_REQ_IRQ_INDEX):
            self.irq_counts[index] = self._irq_count(index) if index < num_irqs else 0

    def _region(self, index: int) -> Region:
        buf = self._info(self.fd, VFIO_DEVICE_GET_REGION_INFO,
                         REGION_INFO.pack(0, 0, index, 0, 0, 0), REGION_INFO.size)
        _argsz, flags, _index, cap_offset, size, offset = REGION_INFO.unpack_from(buf)
        areas: tuple[tuple[int, int], ...] = ()
        if flags & VFIO_REGION_INFO_FLAG_MMAP:
            areas = ((0, size),)
            for cap_id, off in iter_caps(buf, cap_offset if flags & VFIO_REGION_INFO_FLAG_CAPS
                                         else 0):
                if cap_id == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    areas = tuple(a for a in _ranges(buf, off) if a[1] and a[0] + a[1] <= size)
        return Region(index, flags, size, offset, areas)

    def _irq_count(self, index: int) -> int:
        buf = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        try:
            self.ops.ioctl(self.fd, VFIO_DEVICE_GET_IRQ_INFO, buf)
        except OSError:
            return 0   # e.g. EINVAL for the error IRQ of a conventional PCI device
        _argsz, flags, _index, count = IRQ_INFO.unpack(buf)
        return int(count) if flags & VFIO_IRQ_INFO_EVENTFD else 0

    # --- use --------------------------------------------------------------------------------

    def set_irqs(self, index: int, start: int, fds: list[int]) -> None:
        """Signal eventfd ``fds[i]`` for interrupt ``start + i`` of ``index`` (-1: none)."""
        data = struct.pack(f"={len(fds)}i", *fds)
        arg = bytearray(IRQ_SET.pack(IRQ_SET.size + len(data),
                                     VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                                     index, start, len(fds)) + data)
        self.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, arg)

    def disable_irqs(self, index: int) -> None:
        arg = bytearray(IRQ_SET.pack(IRQ_SET.size,
                                     VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                                     index, 0, 0))
        self.ops.ioctl(self.fd, VFIO_DEVICE_SET_IRQS, arg)

    def map_dma(self, vaddr: int, iova: int, size: int) -> None:
        arg = bytearray(DMA_MAP.pack(DMA_MAP.size,
                                     VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                     vaddr, iova, size))
        self.ioctl(self.container, VFIO_IOMMU_MAP_DMA, arg, {
            errno.ENOMEM: f"cannot pin {size} bytes: raise the locked-memory limit (ulimit -l, "
                          "systemd LimitMEMLOCK=) or run as root",
            errno.EINVAL: f"IOVA {iova:#x}+{size:#x} or address {vaddr:#x} rejected"})

    def unmap_dma(self, iova: int, size: int) -> None:
        self.ops.ioctl(self.container, VFIO_IOMMU_UNMAP_DMA,
                       bytearray(DMA_UNMAP.pack(DMA_UNMAP.size, 0, iova, size)))

    def read_config(self, offset: int, length: int) -> bytes:
        """``length`` bytes of PCI config space at ``offset`` (short at the region's end)."""
        region = self.regions[VFIO_PCI_CONFIG_REGION_INDEX]
        length = max(0, min(length, region.size - offset))
        try:
            return self.ops.pread(self.fd, length, region.offset + offset)
        except OSError as e:
            raise failure(self.target, "reading PCI config space", e) from None

    def write_config(self, offset: int, data: bytes) -> None:
        region = self.regions[VFIO_PCI_CONFIG_REGION_INDEX]
        try:
            written = self.ops.pwrite(self.fd, data, region.offset + offset)
        except OSError as e:
            raise failure(self.target, "writing PCI config space", e) from None
        if written != len(data):
            raise ConnectError(f"{self.target}: short write to PCI config space at {offset:#x}")

    def close(self) -> None:
        """Close the device, group and container fds (never raises)."""
        for name in ("fd", "group_fd", "container"):
            fd = getattr(self, name)
            setattr(self, name, -1)
            if fd >= 0:
                try:
                    self.ops.close(fd)
                except OSError:
                    pass
