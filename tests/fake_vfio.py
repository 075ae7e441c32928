"""A fake VFIO stack with a virtio-blk PCI function behind it, for unit tests.

``FakeVfio`` is the system-call surface of vblk_core.transports.vfio (``VfioOps``: open, close,
ioctl, mmap, munmap, pread, pwrite, and ``sysfs_root``) for /dev/vfio/vfio, /dev/vfio/GROUP and the
device fd, behaving as drivers/vfio does where the driver depends on it (argsz and capability
chains, MSI-X enabled by the first SET_IRQS with a fixed vector count, no BAR access without
Memory Space, exact UNMAP_DMA).  ``FakeBlkFunction`` is the PCI function: config space with
a virtio capability list, BARs whose registers are emulated on pread/pwrite (common config,
ISR, device config, notify) or, for an mmappable BAR, live in a shared memfd the fake polls
(the notify area), MSI-X routing of completions to the eventfds given to SET_IRQS, and the
rings served once DRIVER_OK by the device behind it, fake_blk's BlkDevice (the function
is one).

Written from linux/vfio.h and the virtio 1.x spec (4.1), independently of the driver: ioctl
numbers and layouts are spelled out here, not imported.  ``errors`` collects what a real
device or kernel would reject (wrong access width, DMA without Bus Master, unmapping memory
the device is using, ...); tests assert it stays empty.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fake_blk import BlkDevice
from fake_ring import FakeRing
from fake_ring_device import BlkEmulator, serve_queue

MMap = mmap.mmap   # (FakeVfio.mmap shadows the module name in its class)
ADDR = "0000:00:04.0"
GROUP = "7"
# _IO(';', 100 + n), from linux/vfio.h
GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU = 0x3B64, 0x3B65, 0x3B66
GROUP_GET_STATUS, GROUP_SET_CONTAINER, GROUP_GET_DEVICE_FD = 0x3B67, 0x3B68, 0x3B6A
DEVICE_GET_INFO, GET_REGION_INFO, GET_IRQ_INFO, SET_IRQS = 0x3B6B, 0x3B6C, 0x3B6D, 0x3B6E
IOMMU_GET_INFO, MAP_DMA, UNMAP_DMA = 0x3B70, 0x3B71, 0x3B72
NAMES = {v: k for k, v in list(globals().items()) if isinstance(v, int) and 0x3B64 <= v < 0x3B80}
MSIX, ERR, REQ = 2, 3, 4
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 64
NO_VECTOR = 0xFFFF
VERSION_1, ACCESS_PLATFORM = 1 << 32, 1 << 33
#: virtio-blk-pci in QEMU 7.2 with iommu_platform=on: SEG_MAX GEOMETRY BLK_SIZE FLUSH TOPOLOGY
#: CONFIG_WCE MQ DISCARD WRITE_ZEROES NOTIFY_ON_EMPTY ANY_LAYOUT INDIRECT EVENT_IDX VERSION_1
#: ACCESS_PLATFORM
QEMU_FEATURES = 0x339007E54


@dataclass
class VCap:
    """A virtio_pci_cap to put in config space (``cap_len`` None: the right length)."""
    cfg_type: int
    bar: int
    offset: int
    length: int
    multiplier: int | None = None
    cap_len: int | None = None


def qemu_caps(bar: int = 4) -> list[VCap]:
    """QEMU's layout: common at BAR4+0, ISR +0x1000, device +0x2000, notify +0x3000 (x4)."""
    return [VCap(1, bar, 0, 0x1000), VCap(3, bar, 0x1000, 0x1000), VCap(4, bar, 0x2000, 0x1000),
            VCap(2, bar, 0x3000, 0x1000, multiplier=4)]


def split_caps() -> list[VCap]:
    """Common and ISR in BAR4 (registers, pread/pwrite); device config and notify in the
    mmappable BAR2 (a shared memfd)."""
    return [VCap(1, 4, 0, 0x1000), VCap(3, 4, 0x1000, 0x1000), VCap(4, 2, 0, 0x100),
            VCap(2, 2, 0x1000, 0x1000, multiplier=4)]


def config_space(caps: list[VCap], *, vendor: int = 0x1AF4, device: int = 0x1042,
                 subsystem: int = 2, msix_vectors: int | None = 3) -> bytearray:
    """256 bytes of PCI config space: the virtio caps chained from 0x40 (20 bytes apart),
    then an MSI-X capability (table in BAR1) unless ``msix_vectors`` is None."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, vendor, device)
    struct.pack_into("<H", cfg, 0x06, 0x10)                 # status: capability list
    cfg[0x08] = 1                                           # revision
    struct.pack_into("<HH", cfg, 0x2C, 0x1AF4, subsystem)
    positions = [0x40 + 20 * i for i in range(len(caps) + 1)]
    for i, cap in enumerate(caps):
        pos = positions[i]
        cap_len = cap.cap_len or (20 if cap.multiplier is not None else 16)
        struct.pack_into("<BBBBBBxxII", cfg, pos, 0x09, positions[i + 1], cap_len,
                         cap.cfg_type, cap.bar, 0, cap.offset, cap.length)
        if cap.multiplier is not None:
            struct.pack_into("<I", cfg, pos + 16, cap.multiplier)
    last = positions[len(caps)]
    if msix_vectors is None:
        if caps:
            cfg[positions[len(caps) - 1] + 1] = 0
    else:
        struct.pack_into("<BBHII", cfg, last, 0x11, 0, msix_vectors - 1, 1, 0x801)
    cfg[0x34] = 0x40 if caps else (last if msix_vectors is not None else 0)
    return cfg


def make_sysfs(root: Path, *, addr: str = ADDR, group: str | None = GROUP,
               driver: str | None = "vfio-pci", others: dict[str, str | None] | None = None,
               noiommu: bool = False) -> Path:
    """A sysfs tree under ``root``: the device (its driver link, its iommu_group link) and
    the group's members (``others``: address -> driver)."""
    sysfs = root / "sys"
    devices = sysfs / "bus" / "pci" / "devices"
    drivers = sysfs / "bus" / "pci" / "drivers"
    members = {addr: driver, **(others or {})}
    for member, drv in members.items():
        d = devices / member
        d.mkdir(parents=True, exist_ok=True)
        if drv:
            (drivers / drv).mkdir(parents=True, exist_ok=True)
            (d / "driver").symlink_to(drivers / drv)
        if group is not None:
            g = sysfs / "kernel" / "iommu_groups" / group
            (g / "devices").mkdir(parents=True, exist_ok=True)
            (d / "iommu_group").symlink_to(g)
            (g / "devices" / member).symlink_to(d)
            if noiommu:
                (g / "name").write_text("vfio-noiommu\n")
    return sysfs


@dataclass
class FakeQueue:
    max_size: int
    size: int = 0
    vector: int = NO_VECTOR
    enable: int = 0
    notify_off: int = 0
    addr: dict[int, int] = field(default_factory=dict)   # common-cfg offset -> 32-bit half
    kick_fd: int | None = None                           # while the device runs


# virtio_blk_config: offset -> width of the field there (u64 as two u32 halves)
BLK_FIELDS = {0: 4, 4: 4, 8: 4, 12: 4, 16: 2, 18: 1, 19: 1, 20: 4, 24: 1, 25: 1, 26: 2, 28: 4,
              32: 1, 33: 1, 34: 2, 36: 4, 40: 4, 44: 4, 48: 4, 52: 4, 56: 1}
# common config: offset -> (width, name)
COMMON = {0x00: (4, "dfselect"), 0x04: (4, "df"), 0x08: (4, "gfselect"), 0x0C: (4, "gf"),
          0x10: (2, "msix_config"), 0x12: (2, "num_queues"), 0x14: (1, "status"),
          0x15: (1, "generation"), 0x16: (2, "queue_select"), 0x18: (2, "queue_size"),
          0x1A: (2, "queue_msix_vector"), 0x1C: (2, "queue_enable"),
          0x1E: (2, "queue_notify_off"), **{o: (4, "queue_addr") for o in range(0x20, 0x38, 4)}}


class FakeBlkFunction(BlkDevice):
    """A virtio-blk PCI function.  Knobs: ``features`` offered, ``num_queues``,
    ``queue_max`` (per queue), ``caps``/``cfg`` (config space), ``bar_sizes``, ``mmappable``
    BARs, ``accept_features`` (FEATURES_OK sticks), ``reset_completes``, ``refuse_vectors``,
    ``generation_flips`` (device config reads that bump config_generation)."""

    def __init__(self, disk: bytearray, config: bytes, *, features: int = QEMU_FEATURES,
                 num_queues: int = 2, queue_max: int | list[int] = 256,
                 caps: list[VCap] | None = None, msix_vectors: int = 3,
                 cfg: bytearray | None = None, bar_sizes: dict[int, int] | None = None,
                 mmappable: set[int] | None = None, accept_features: bool = True,
                 reset_completes: bool = True, refuse_vectors: set[int] | None = None,
                 generation_flips: int = 0) -> None:
        super().__init__(disk, config, features=features)
        self.num_queues = num_queues
        maxes = queue_max if isinstance(queue_max, list) else [queue_max] * num_queues
        self.queue_max = maxes
        self.caps = caps if caps is not None else qemu_caps()
        self.cfg = cfg if cfg is not None else config_space(self.caps, msix_vectors=msix_vectors)
        self.msix_vectors = msix_vectors
        self.bar_sizes = bar_sizes if bar_sizes is not None else {1: 0x1000, 2: 0x2000,
                                                                  4: 0x4000}
        self.mmappable = mmappable if mmappable is not None else set()
        self.accept_features = accept_features
        self.reset_completes = reset_completes
        self.refuse_vectors = refuse_vectors or set()
        self.generation_flips = generation_flips
        self.regs = threading.RLock()       # registers
        self._halt = threading.Event()      # stops the notify poller
        self.log: list[tuple[str, int, int]] = []    # (structure, offset, value) of writes
        self.memfds = {bar: os.memfd_create(f"bar{bar}") for bar in self.mmappable}
        for bar, fd in self.memfds.items():
            os.ftruncate(fd, self.bar_sizes[bar])
        for cap in self.caps:
            if cap.cfg_type == 4 and cap.bar in self.memfds:
                os.pwrite(self.memfds[cap.bar], self.config, cap.offset)
        self.vfio: FakeVfio | None = None
        self._threads: list[threading.Thread] = []
        self._stop = -1
        self._reset()

    # --- state ----------------------------------------------------------------------------

    def _reset(self) -> None:
        self._stop_service()
        self.status = 0
        self.dfselect = self.gfselect = 0
        self.driver_features = 0
        self.msix_config = NO_VECTOR
        self.generation = 0
        self.queue_select = 0
        self.queues = [FakeQueue(m, m, notify_off=i) for i, m in enumerate(self.queue_max)]

    def cap(self, cfg_type: int) -> VCap:
        return next(c for c in self.caps if c.cfg_type == cfg_type)

    def command(self) -> int:
        return int(struct.unpack_from("<H", self.cfg, 4)[0])

    # --- BAR access -------------------------------------------------------------------------

    def bar_read(self, bar: int, off: int, width: int) -> int:
        with self.regs:
            if not self.command() & 0x2:
                raise OSError(errno.EIO, "BAR access with Memory Space disabled")
            for cap in self.caps:
                if cap.bar == bar and cap.offset <= off < cap.offset + cap.length:
                    return self._read(cap, off - cap.offset, width)
            if bar in self.memfds:
                return int.from_bytes(os.pread(self.memfds[bar], width, off), "little")
            return 0

    def bar_write(self, bar: int, off: int, width: int, value: int) -> None:
        with self.regs:
            if not self.command() & 0x2:
                raise OSError(errno.EIO, "BAR access with Memory Space disabled")
            for cap in self.caps:
                if cap.bar == bar and cap.offset <= off < cap.offset + cap.length:
                    self.log.append((("", "common", "notify", "isr", "device")[cap.cfg_type],
                                     off - cap.offset, value))
                    return self._write(cap, off - cap.offset, width, value)

    def _read(self, cap: VCap, off: int, width: int) -> int:
        if cap.cfg_type == 4:
            if BLK_FIELDS.get(off, 1) != width:
                self.errors.append(f"device config: {width}-byte read at {off:#x}")
            if self.generation_flips:
                self.generation_flips -= 1
                self.generation = (self.generation + 1) & 0xFF
            if cap.bar in self.memfds:
                return int.from_bytes(os.pread(self.memfds[cap.bar], width, cap.offset + off),
                                      "little")
            return int.from_bytes(self.config[off:off + width].ljust(width, b"\0"), "little")
        if cap.cfg_type != 1:
            return 0
        name = self._field(off, width)
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        if name == "df":
            return self.features >> (32 * self.dfselect) & 0xFFFFFFFF if self.dfselect < 2 else 0
        if name == "gf":
            return self.driver_features >> (32 * self.gfselect) & 0xFFFFFFFF
        if name == "num_queues":
            return self.num_queues
        if name.startswith("queue_") and name != "queue_select":
            if q is None:
                return 0
            if name == "queue_addr":
                return q.addr.get(off, 0)
            return int(getattr(q, {"queue_size": "size", "queue_msix_vector": "vector",
                                   "queue_enable": "enable",
                                   "queue_notify_off": "notify_off"}[name]))
        return int(getattr(self, name, 0))

    def _field(self, off: int, width: int) -> str:
        got = COMMON.get(off)
        if got is None or got[0] != width:
            self.errors.append(f"common config: {width}-byte access at {off:#x}")
            return ""
        return got[1]

    def _write(self, cap: VCap, off: int, width: int, value: int) -> None:
        if cap.cfg_type == 2:
            self._notify(off, width, value)
            return
        if cap.cfg_type != 1:
            return
        name = self._field(off, width)
        q = self.queues[self.queue_select] if self.queue_select < len(self.queues) else None
        if name in ("dfselect", "gfselect", "queue_select"):
            setattr(self, name, value)
        elif name == "gf" and self.gfselect < 2:
            mask = 0xFFFFFFFF << (32 * self.gfselect)
            self.driver_features = (self.driver_features & ~mask) | value << (32 * self.gfselect)
        elif name == "status":
            self._set_status(value)
        elif name == "msix_config":
            self.msix_config = self._vector(value)
        elif q is not None and name.startswith("queue_"):
            if not self.status & FEATURES_OK:
                self.errors.append(f"{name} written before FEATURES_OK")
            if name == "queue_size":
                if value > q.max_size or value & (value - 1) or not value:
                    self.errors.append(f"queue size {value} > max {q.max_size}")
                q.size = value
            elif name == "queue_msix_vector":
                q.vector = self._vector(value)
            elif name == "queue_enable":
                q.enable = value
            elif name == "queue_addr":
                q.addr[off] = value

    def _vector(self, value: int) -> int:
        if value == NO_VECTOR or value in self.refuse_vectors or value >= self.msix_vectors:
            return NO_VECTOR
        vfio = self.vfio
        if vfio is None or MSIX not in vfio.irqs:
            self.errors.append(f"MSI-X vector {value} set while MSI-X is disabled")
        return value

    def _set_status(self, value: int) -> None:
        if value == 0:
            if self.reset_completes:
                self._reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            if not self.accept_features or self.driver_features & ~self.features:
                value &= ~FEATURES_OK
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            self.status = value
            self._start_service()
            return
        self.status = value

    def _notify(self, off: int, width: int, value: int) -> None:
        notify = self.cap(2)
        if width != 2 or value >= len(self.queues) or (
                off != self.queues[value].notify_off * (notify.multiplier or 0)):
            self.errors.append(f"bad notify: {width} bytes of {value} at {off:#x}")
            return
        kick = self.queues[value].kick_fd
        if kick is not None:
            os.eventfd_write(kick, 1)

    # --- the device running -----------------------------------------------------------------

    def _start_service(self) -> None:
        vfio = self.vfio
        assert vfio is not None
        if not self.command() & 0x4:
            self.errors.append("DRIVER_OK without Bus Master")
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self.ack_features(self.driver_features)
        for i, q in enumerate(self.queues):
            if not q.enable:
                continue
            lo_hi = [q.addr.get(o, 0) | q.addr.get(o + 4, 0) << 32 for o in (0x20, 0x28, 0x30)]
            mapping = vfio.mapping_of(lo_hi[0], 16 * q.size)
            fd = vfio.irqs.get(MSIX, {}).get(q.vector)
            if mapping is None or fd is None:
                self.errors.append(f"queue {i}: ring at {lo_hi[0]:#x} not mapped, or vector "
                                   f"{q.vector} has no eventfd")
                continue
            iova, mem = mapping
            desc, avail, used = (a - iova for a in lo_hi)
            ring = FakeRing(mem, q.size, desc, avail, used, iova)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            q.kick_fd = kick
            t = threading.Thread(target=serve_queue, args=(BlkEmulator(ring, self, index=i),
                                                           os.dup(fd), os.dup(kick), self._stop),
                                 daemon=True, name=f"fake-vfio-q{i}")
            self._threads.append(t)
            t.start()
        notify = self.cap(2)
        if notify.bar in self.memfds:
            m = mmap.mmap(self.memfds[notify.bar], self.bar_sizes[notify.bar])
            m[notify.offset:notify.offset + notify.length] = b"\xff" * notify.length
            self._halt.clear()
            t = threading.Thread(target=self._poll_notify, args=(m, notify, self.queues),
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _poll_notify(self, m: mmap.mmap, notify: VCap, queues: list[FakeQueue]) -> None:
        """The mmapped notify area: a store there is only seen by looking."""
        try:
            while not self._halt.wait(0.0005):
                for i, q in enumerate(queues):
                    off = notify.offset + q.notify_off * (notify.multiplier or 0)
                    value = struct.unpack_from("<H", m, off)[0]
                    if value != NO_VECTOR:
                        struct.pack_into("<H", m, off, NO_VECTOR)
                        if value != i:
                            self.errors.append(f"queue {i}'s notify slot got {value}")
                        elif q.kick_fd is not None:
                            os.eventfd_write(q.kick_fd, 1)
        finally:
            m.close()

    def _stop_service(self) -> None:
        if self._stop >= 0:
            os.eventfd_write(self._stop, 1)
            self._halt.set()
            stop, self._stop = self._stop, -1
            for t in self._threads:
                t.join(5)
            self._threads.clear()
            os.close(stop)
        for q in getattr(self, "queues", []):
            if q.kick_fd is not None:
                os.close(q.kick_fd)
                q.kick_fd = None

    @property
    def running(self) -> bool:
        return self._stop >= 0

    def needs_reset(self) -> None:
        """The device breaks: DEVICE_NEEDS_RESET and a config-change interrupt."""
        with self.regs:
            self.status |= NEEDS_RESET
            vfio = self.vfio
            fd = vfio.irqs.get(MSIX, {}).get(self.msix_config) if vfio else None
        if fd is not None:
            os.eventfd_write(fd, 1)

    def close(self) -> None:
        self._stop_service()
        for fd in self.memfds.values():
            os.close(fd)
        self.memfds.clear()


class FakeVfio:
    """VfioOps for one group holding one function.  Knobs: ``open_errors`` (path -> errno),
    ``fail`` (ioctl name -> errno), ``api_version``, ``extensions``, ``viable``,
    ``iova_ranges``, ``region_flags`` (index -> flags override), ``sparse`` (BAR -> mmappable
    areas), ``err_irq``/``req_irq``."""

    OFFSET_SHIFT = 40

    def __init__(self, sysfs: Path, function: FakeBlkFunction, *, addr: str = ADDR,
                 group: str = GROUP) -> None:
        self.sysfs_root = str(sysfs)
        self.fn = function
        function.vfio = self
        self.addr = addr
        self.group = group
        self.open_errors: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.api_version = 0
        self.extensions = {1: 1, 3: 1}
        self.viable = True
        self.iova_ranges = [(0, 0xFEDFFFFF), (0xFEF00000, 0x7FFFFFFFFF)]
        self.pgsizes = 0x40201000
        self.region_flags: dict[int, int] = {}
        self.sparse: dict[int, list[tuple[int, int]]] = {}   # BAR -> mmappable (offset, size)
        self.err_irq = False
        self.req_irq = True
        self.calls: list[str] = []
        self.fds: dict[int, str] = {}
        self._next_fd = 1 << 20
        self.container_set = False
        self.iommu: int | None = None
        self.maps: dict[int, tuple[int, int]] = {}        # iova -> (vaddr, size)
        self.irqs: dict[int, dict[int, int]] = {}         # index -> vector -> our dup of fd
        self.irq_count: dict[int, int] = {}
        self.disabled: list[int] = []                    # SET_IRQS(DATA_NONE, count 0) seen
        self.unmapped: list[tuple[int, int]] = []        # UNMAP_DMA seen (iova, size)
        self.opens = 0
        self.mmaps: list[MMap] = []

    # --- files ----------------------------------------------------------------------------

    def open(self, path: str) -> int:
        if path in self.open_errors:
            raise OSError(self.open_errors[path], os.strerror(self.open_errors[path]), path)
        kinds = {"/dev/vfio/vfio": "container", f"/dev/vfio/{self.group}": "group"}
        if path not in kinds:
            raise OSError(errno.ENOENT, "No such file or directory", path)
        if kinds[path] == "group" and "group" in self.fds.values():
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        return self._new_fd(kinds[path])

    def _new_fd(self, kind: str) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self.fds[fd] = kind
        return fd

    def close(self, fd: int) -> None:
        kind = self.fds.pop(fd)
        if kind == "device":
            self.fn._stop_service()
            for index in list(self.irqs):
                self._disable(index)
        elif kind == "container":
            self.maps.clear()
            self.iommu = None
            self.container_set = False

    # --- ioctls -----------------------------------------------------------------------------

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int:
        name = NAMES.get(request, hex(request))
        self.calls.append(name)
        if name in self.fail:
            raise OSError(self.fail[name], os.strerror(self.fail[name]))
        kind = self.fds.get(fd)
        handler = getattr(self, f"_{name.lower()}", None)
        if kind is None or handler is None:
            raise OSError(errno.ENOTTY if kind else errno.EBADF, name)
        return int(handler(kind, arg))

    def _get_api_version(self, kind: str, arg: object) -> int:
        return self.api_version

    def _check_extension(self, kind: str, arg: object) -> int:
        assert isinstance(arg, int)
        return self.extensions.get(arg, 0)

    def _group_get_status(self, kind: str, arg: bytearray) -> int:
        assert kind == "group" and struct.unpack_from("=I", arg)[0] >= 8
        struct.pack_into("=I", arg, 4, (1 if self.viable else 0) | (2 if self.container_set
                                                                     else 0))
        return 0

    def _group_set_container(self, kind: str, arg: bytearray) -> int:
        container = struct.unpack("=i", arg)[0]
        if kind != "group" or self.fds.get(container) != "container" or not self.viable:
            raise OSError(errno.EINVAL, "GROUP_SET_CONTAINER")
        self.container_set = True
        return 0

    def _set_iommu(self, kind: str, arg: int) -> int:
        if kind != "container" or not self.container_set or arg not in self.extensions:
            raise OSError(errno.EINVAL, "SET_IOMMU")
        self.iommu = arg
        return 0

    def _iommu_get_info(self, kind: str, arg: bytearray) -> int:
        argsz = struct.unpack_from("=I", arg)[0]
        if kind != "container" or self.iommu is None or argsz < 24:
            raise OSError(errno.EINVAL, "IOMMU_GET_INFO")
        # The IOVA ranges, then the migration and DMA-available capabilities, as the kernel
        # reports them (2 ranges: 120 bytes in all).
        off_mig = 24 + 16 + 16 * len(self.iova_ranges)
        caps = (struct.pack("=HHIII", 1, 1, off_mig, len(self.iova_ranges), 0)
                + b"".join(struct.pack("=QQ", *r) for r in self.iova_ranges)
                + struct.pack("=HHIIIQQ", 2, 1, off_mig + 32, 0, 0, 0x1000, 1 << 20)
                + struct.pack("=HHIIxxxx", 3, 1, 0, 65535))
        needed = 24 + len(caps)
        if argsz < needed:
            struct.pack_into("=IIQII", arg, 0, needed, 3, self.pgsizes, 0, 0)
        else:
            struct.pack_into("=IIQII", arg, 0, argsz, 3, self.pgsizes, 24, 0)
            arg[24:needed] = caps
        return 0

    def _group_get_device_fd(self, kind: str, arg: bytearray) -> int:
        if kind != "group" or self.iommu is None:
            raise OSError(errno.EINVAL, "GROUP_GET_DEVICE_FD")
        if bytes(arg).split(b"\0")[0].decode() != self.addr:
            raise OSError(errno.ENODEV, "GROUP_GET_DEVICE_FD")
        if "device" in self.fds.values():
            raise OSError(errno.EBUSY, "GROUP_GET_DEVICE_FD")
        self.opens += 1
        return self._new_fd("device")

    def _device_get_info(self, kind: str, arg: bytearray) -> int:
        assert kind == "device" and struct.unpack_from("=I", arg)[0] >= 16
        struct.pack_into("=III", arg, 4, 0x3, 9, 5)   # RESET|PCI, 9 regions, 5 irqs
        return 0

    def _get_region_info(self, kind: str, arg: bytearray) -> int:
        argsz, _flags, index = struct.unpack_from("=III", arg)
        if kind != "device" or argsz < 32 or index > 8:
            raise OSError(errno.EINVAL, "GET_REGION_INFO")
        if index == 7:
            size, flags = len(self.fn.cfg), 0x3
        elif index < 6:
            size = self.fn.bar_sizes.get(index, 0)
            flags = (0x3 | (0x4 if index in self.fn.mmappable else 0)) if size else 0
        else:
            size, flags = 0, 0
        flags = self.region_flags.get(index, flags)
        areas = self.sparse.get(index) if flags & 0x4 else None
        cap_offset = 0
        if areas is not None:                 # VFIO_REGION_INFO_CAP_SPARSE_MMAP
            flags |= 0x8
            cap = struct.pack("=HHIII", 1, 1, 0, len(areas), 0) + b"".join(
                struct.pack("=QQ", *a) for a in areas)
            if argsz >= 32 + len(cap):
                arg[32:32 + len(cap)] = cap
                cap_offset = 32
            else:
                argsz = 32 + len(cap)         # tell the caller how much room it needs
        struct.pack_into("=IIIIQQ", arg, 0, argsz, flags, index, cap_offset, size,
                         index << self.OFFSET_SHIFT)
        return 0

    def _get_irq_info(self, kind: str, arg: bytearray) -> int:
        _argsz, _flags, index = struct.unpack_from("=III", arg)
        counts = {0: 1, 1: 1, MSIX: self.fn.msix_vectors, ERR: 1 if self.err_irq else 0,
                  REQ: 1 if self.req_irq else 0}
        if index == ERR and not self.err_irq:
            raise OSError(errno.EINVAL, "GET_IRQ_INFO")   # as on QEMU's device
        struct.pack_into("=II", arg, 4, 0x9 if index == MSIX else 0x1, index)
        struct.pack_into("=I", arg, 12, counts.get(index, 0))
        return 0

    def _set_irqs(self, kind: str, arg: bytearray) -> int:
        argsz, flags, index, start, count = struct.unpack_from("=IIIII", arg)
        if kind != "device" or argsz != 20 + (4 * count if flags & 0x4 else 0):
            raise OSError(errno.EINVAL, "SET_IRQS argsz")
        if flags == 0x21 and count == 0:          # DATA_NONE | ACTION_TRIGGER: disable
            self._disable(index, explicit=True)
            return 0
        if flags != 0x24:
            raise OSError(errno.EINVAL, "SET_IRQS flags")
        limit = {MSIX: self.fn.msix_vectors, ERR: int(self.err_irq), REQ: int(self.req_irq)}
        fds = struct.unpack_from(f"={count}i", arg, 20)
        if index not in self.irqs:
            if start + count > limit.get(index, 0):
                raise OSError(errno.EINVAL, "SET_IRQS count")
            self.irqs[index] = {}
            self.irq_count[index] = start + count      # fixed until disabled (older kernels)
        elif start + count > self.irq_count[index]:
            raise OSError(errno.EINVAL, "SET_IRQS beyond the enabled vectors")
        vectors = self.irqs[index]
        for i, fd in enumerate(fds):
            old = vectors.pop(start + i, None)
            if old is not None:
                os.close(old)
            if fd >= 0:
                vectors[start + i] = os.dup(fd)    # the kernel holds the eventfd itself
        return 0

    def _disable(self, index: int, explicit: bool = False) -> None:
        if explicit:
            self.disabled.append(index)
        for fd in self.irqs.pop(index, {}).values():
            os.close(fd)
        self.irq_count.pop(index, None)

    def _map_dma(self, kind: str, arg: bytearray) -> int:
        argsz, flags, vaddr, iova, size = struct.unpack("=IIQQQ", arg)
        if kind != "container" or self.iommu is None or argsz != 32 or flags != 0x3:
            raise OSError(errno.EINVAL, "MAP_DMA")
        if (vaddr | iova | size) & 0xFFF or not size or not any(
                a <= iova and iova + size - 1 <= b for a, b in self.iova_ranges):
            raise OSError(errno.EINVAL, "MAP_DMA range")
        if any(i < iova + size and iova < i + s for i, (_, s) in self.maps.items()):
            raise OSError(errno.EEXIST, "MAP_DMA overlap")
        self.maps[iova] = (vaddr, size)
        return 0

    def _unmap_dma(self, kind: str, arg: bytearray) -> int:
        _argsz, _flags, iova, size = struct.unpack("=IIQQ", arg)
        if self.maps.get(iova, (0, -1))[1] != size:
            raise OSError(errno.EINVAL, "UNMAP_DMA")
        if self.fn.running:
            self.fn.errors.append("memory unmapped while the device runs")
        del self.maps[iova]
        self.unmapped.append((iova, size))
        return 0

    def mapping_of(self, iova: int, length: int) -> tuple[int, memoryview] | None:
        """(base iova, view of the whole mapping) holding [iova, iova+length), or None."""
        for base, (vaddr, size) in self.maps.items():
            if base <= iova and iova + length <= base + size:
                return base, memoryview((ctypes.c_char * size).from_address(vaddr)).cast("B")
        return None

    # --- regions ----------------------------------------------------------------------------

    def _region(self, fd: int, offset: int) -> tuple[int, int]:
        if self.fds.get(fd) != "device":
            raise OSError(errno.EBADF, "not the device fd")
        return offset >> self.OFFSET_SHIFT, offset & ((1 << self.OFFSET_SHIFT) - 1)

    def pread(self, fd: int, length: int, offset: int) -> bytes:
        index, off = self._region(fd, offset)
        if index == 7:
            return bytes(self.fn.cfg[off:off + length])
        if length not in (1, 2, 4) or off % length:
            self.fn.errors.append(f"BAR{index} read of {length} bytes at {off:#x}")
        return self.fn.bar_read(index, off, length).to_bytes(length, "little")

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        index, off = self._region(fd, offset)
        if index == 7:
            if off == 4 and len(data) == 2:            # only the command register is ours
                self.fn.cfg[4:6] = data
            return len(data)
        if len(data) not in (1, 2, 4) or off % len(data):
            self.fn.errors.append(f"BAR{index} write of {len(data)} bytes at {off:#x}")
        self.fn.bar_write(index, off, len(data), int.from_bytes(data, "little"))
        return len(data)

    def mmap(self, fd: int, length: int, offset: int) -> MMap:
        index, off = self._region(fd, offset)
        areas = self.sparse.get(index, [(0, self.fn.bar_sizes.get(index, 0))])
        if index not in self.fn.memfds or not any(
                a <= off and off + length <= a + n for a, n in areas):
            raise OSError(errno.EINVAL, "mmap")
        m = mmap.mmap(self.fn.memfds[index], length, offset=off)
        self.mmaps.append(m)
        return m

    def munmap(self, buf: MMap | bytearray) -> None:
        assert isinstance(buf, MMap)
        try:
            buf.close()
        except BufferError:
            self.fn.errors.append("a BAR mapping is still exported at munmap")
            raise
