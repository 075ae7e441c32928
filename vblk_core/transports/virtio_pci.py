"""virtio 1.x over PCI (virtio spec 4.1): identity, capability list, and register access.

``parse_config_space`` checks the function is a modern virtio-blk device and finds its virtio
structures (common config, notify, ISR, device config) from the vendor-specific capabilities,
and the MSI-X table size.  The device is untrusted: every pointer, length, BAR index and
offset is checked, the walk is bounded, and a malformed list is a DeviceError saying what is
wrong (never an IndexError or a hang).

A ``Window`` reads and writes one structure with single accesses of the field's width, either
through an mmap of the BAR (memoryview casts: one load or store each) or with pread/pwrite on
the VFIO device fd.  ``CommonCfg`` names the common configuration's fields (4.1.4.3).
"""
from __future__ import annotations

import enum
import errno
import struct
from dataclasses import dataclass

from ..errors import ConnectError, DeviceError, TransportError
from .vfio import VfioOps

PCI_VENDOR_ID_VIRTIO = 0x1AF4
PCI_DEVICE_ID_BLK_MODERN = 0x1040 + 2
PCI_DEVICE_ID_BLK_TRANSITIONAL = 0x1001
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_STD_HEADER_SIZE = 0x40
PCI_STD_CONFIG_SIZE = 0x100
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
MSIX_CAP_SIZE = 12
VIRTIO_CAP = struct.Struct("<BBBBBBxxII")   # vndr, next, len, cfg_type, bar, id, offset, length
VIRTIO_MSI_NO_VECTOR = 0xFFFF
NUM_BARS = 6
#: Access widths of struct virtio_blk_config's fields (5.2.4) from offset 0: the driver reads
#: each field with its own width, 64-bit ones as two 32-bit halves (4.1.3.1).  Capacity,
#: size_max, seg_max, geometry, blk_size, topology, writeback, num_queues, discard and
#: write-zeroes limits, write_zeroes_may_unmap, padding: 60 bytes.
BLK_CONFIG_WIDTHS = (4, 4, 4, 4, 2, 1, 1, 4, 1, 1, 2, 4, 1, 1, 2, 4, 4, 4, 4, 4, 1, 1, 1, 1)


class CfgType(enum.IntEnum):
    """virtio_pci_cap.cfg_type (4.1.4)."""
    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


#: Smallest usable length and required offset alignment of each structure we use.
_MIN_LENGTH = {CfgType.COMMON: 0x38, CfgType.NOTIFY: 2, CfgType.ISR: 1, CfgType.DEVICE: 8}
_ALIGN = {CfgType.COMMON: 4, CfgType.NOTIFY: 2, CfgType.ISR: 1, CfgType.DEVICE: 4}


@dataclass(frozen=True)
class VirtioCap:
    """One virtio structure: ``length`` bytes at ``offset`` in BAR ``bar``; ``position`` is
    the capability's place in config space; ``multiplier`` the notify_off_multiplier."""
    cfg_type: CfgType
    bar: int
    offset: int
    length: int
    position: int
    multiplier: int = 0


@dataclass(frozen=True)
class PciLayout:
    """Where a virtio-blk function keeps its structures, and its MSI-X table size."""
    device_id: int
    common: VirtioCap
    notify: VirtioCap
    device: VirtioCap
    isr: VirtioCap | None
    msix_vectors: int


def parse_config_space(cfg: bytes, bar_sizes: dict[int, int], target: str) -> PciLayout:
    """Check identity and walk the capability list of ``cfg`` (the function's PCI config
    space); ``bar_sizes`` maps BAR index to size.  ConnectError (ENODEV) if this is not a
    virtio-blk function, DeviceError if its capabilities are malformed."""
    if len(cfg) < PCI_STD_HEADER_SIZE:
        raise DeviceError(f"{target}: PCI config space is {len(cfg)} bytes, expected at least "
                          f"{PCI_STD_HEADER_SIZE}")
    vendor, device_id = struct.unpack_from("<HH", cfg, 0)
    subsystem = struct.unpack_from("<H", cfg, PCI_SUBSYSTEM_ID)[0]
    if vendor != PCI_VENDOR_ID_VIRTIO or not (
            device_id == PCI_DEVICE_ID_BLK_MODERN
            or device_id == PCI_DEVICE_ID_BLK_TRANSITIONAL and subsystem == 2):
        raise ConnectError(f"{target} is not a virtio-blk function: vendor {vendor:#06x} device "
                           f"{device_id:#06x} subsystem {subsystem:#06x} (expected 1af4:1042, or "
                           "1af4:1001 with subsystem id 2)", errno.ENODEV)
    status = struct.unpack_from("<H", cfg, PCI_STATUS)[0]
    if not status & PCI_STATUS_CAP_LIST:
        raise DeviceError(f"{target} has no PCI capability list: not a modern virtio device")
    found: dict[CfgType, VirtioCap] = {}
    problems: list[str] = []
    msix_vectors = 0
    end = min(len(cfg), PCI_STD_CONFIG_SIZE)
    seen: set[int] = set()
    pos = cfg[PCI_CAPABILITY_LIST]
    while pos:
        if pos in seen:
            raise DeviceError(f"{target}: the PCI capability list loops (back to {pos:#x})")
        if pos < PCI_STD_HEADER_SIZE or pos % 4 or pos + 2 > end:
            raise DeviceError(f"{target}: PCI capability pointer {pos:#x} is outside "
                              f"[{PCI_STD_HEADER_SIZE:#x}, {end:#x}) or not 4-byte aligned")
        seen.add(pos)   # at most 48 aligned places: the walk is bounded
        cap_id, nxt = cfg[pos], cfg[pos + 1]
        if cap_id == PCI_CAP_ID_MSIX:
            if pos + MSIX_CAP_SIZE > end:
                raise DeviceError(f"{target}: the MSI-X capability at {pos:#x} is truncated")
            msix_vectors = (struct.unpack_from("<H", cfg, pos + 2)[0] & 0x7FF) + 1
        elif cap_id == PCI_CAP_ID_VNDR:
            cap = _virtio_cap(cfg, pos, end, bar_sizes, target, problems)
            if cap is not None and cap.cfg_type not in found:
                found[cap.cfg_type] = cap   # the first usable one of each type (4.1.4.1)
        pos = nxt
    missing = [t.name for t in (CfgType.COMMON, CfgType.NOTIFY, CfgType.DEVICE) if t not in found]
    if missing:
        why = f" ({'; '.join(problems)})" if problems else ""
        raise DeviceError(f"{target} has no usable virtio {'/'.join(missing)} capability{why}")
    return PciLayout(device_id, found[CfgType.COMMON], found[CfgType.NOTIFY],
                     found[CfgType.DEVICE], found.get(CfgType.ISR), msix_vectors)


def _virtio_cap(cfg: bytes, pos: int, end: int, bar_sizes: dict[int, int], target: str,
                problems: list[str]) -> VirtioCap | None:
    """The virtio structure described at ``pos``, or None (with a note in ``problems``) for
    one the driver must ignore or cannot use."""
    cap_len = cfg[pos + 2] if pos + 3 <= end else 0
    if cap_len < VIRTIO_CAP.size or pos + cap_len > end:
        raise DeviceError(f"{target}: the virtio capability at {pos:#x} is truncated "
                          f"(cap_len {cap_len}, config space ends at {end:#x})")
    _vndr, _next, _len, cfg_type, bar, _id, offset, length = VIRTIO_CAP.unpack_from(cfg, pos)
    if cfg_type not in _MIN_LENGTH:
        return None   # PCI access, shared memory, vendor data, or reserved: not used here
    kind = CfgType(cfg_type)
    where = f"the {kind.name} capability at {pos:#x}"
    if bar >= NUM_BARS:
        problems.append(f"{where} names BAR {bar}")
        return None
    multiplier = 0
    if kind is CfgType.NOTIFY:
        if cap_len < VIRTIO_CAP.size + 4:
            raise DeviceError(f"{target}: {where} is truncated (cap_len {cap_len}, needs 20)")
        multiplier = struct.unpack_from("<I", cfg, pos + VIRTIO_CAP.size)[0]
        if multiplier & (multiplier - 1):
            problems.append(f"{where} has notify_off_multiplier {multiplier}, not a power of 2")
            return None
    bar_size = bar_sizes.get(bar, 0)
    if offset + length > bar_size:
        problems.append(f"{where} ({length:#x} bytes at {offset:#x}) lies past the end of BAR "
                        f"{bar} ({bar_size:#x} bytes)")
        return None
    if length < _MIN_LENGTH[kind] or offset % _ALIGN[kind]:
        problems.append(f"{where} is too short ({length:#x} bytes) or misaligned ({offset:#x})")
        return None
    return VirtioCap(kind, bar, offset, length, pos, multiplier)


class Window:
    """Access to ``length`` bytes of one virtio structure, one access of ``width`` (1, 2 or 4)
    bytes per field.  Raises TransportError if an access fails, DeviceError for an access
    outside the structure or misaligned."""

    def __init__(self, name: str, length: int) -> None:
        self.name = name
        self.length = length

    def _check(self, off: int, width: int) -> None:
        if off < 0 or off % width or off + width > self.length:
            raise DeviceError(f"{self.name}: {width}-byte access at {off:#x} outside its "
                              f"{self.length:#x} bytes or misaligned")

    def read(self, off: int, width: int) -> int:
        raise NotImplementedError

    def write(self, off: int, width: int, value: int) -> None:
        raise NotImplementedError

    def release(self) -> None:
        """Drop any view on a mapping (idempotent)."""

    def read_bytes(self, size: int, widths: tuple[int, ...]) -> bytes:
        """The first ``size`` bytes (at most ``length``), each field read with its own width
        (``widths``, in order from offset 0); bytes past them one at a time."""
        size = min(size, self.length)
        out = bytearray()
        for width in widths:
            if len(out) + width > size:
                break
            out += self.read(len(out), width).to_bytes(width, "little")
        while len(out) < size:
            out.append(self.read(len(out), 1))
        return bytes(out)


class MappedWindow(Window):
    """A Window on an mmapped BAR (``view`` covers the structure; little-endian host):
    memoryview casts make each access a single load or store of its width."""

    def __init__(self, name: str, view: memoryview) -> None:
        super().__init__(name, len(view))
        n = len(view)
        self._views = {1: view, 2: view[:n // 2 * 2].cast("H"), 4: view[:n // 4 * 4].cast("I")}

    def read(self, off: int, width: int) -> int:
        self._check(off, width)
        return int(self._views[width][off // width])

    def write(self, off: int, width: int, value: int) -> None:
        self._check(off, width)
        self._views[width][off // width] = value

    def slot16(self, off: int) -> memoryview:
        """A one-element 16-bit view at ``off`` (the caller releases it)."""
        self._check(off, 2)
        return self._views[2][off >> 1:(off >> 1) + 1]

    def release(self) -> None:
        for view in reversed(self._views.values()):
            view.release()


class FileWindow(Window):
    """A Window through pread/pwrite on the VFIO device fd at ``file_offset``."""

    _FORMATS = {1: "<B", 2: "<H", 4: "<I"}

    def __init__(self, name: str, ops: VfioOps, fd: int, file_offset: int,
                 length: int) -> None:
        super().__init__(name, length)
        self.ops = ops
        self.fd = fd
        self.file_offset = file_offset

    def read(self, off: int, width: int) -> int:
        self._check(off, width)
        try:
            data = self.ops.pread(self.fd, width, self.file_offset + off)
        except OSError as e:
            raise TransportError(f"reading {self.name} at {off:#x} failed: "
                                 f"{e.strerror or e}", e.errno or errno.EIO) from None
        if len(data) != width:
            raise TransportError(f"reading {self.name} at {off:#x}: short read")
        value: int = struct.unpack(self._FORMATS[width], data)[0]
        return value

    def write(self, off: int, width: int, value: int) -> None:
        self._check(off, width)
        data = struct.pack(self._FORMATS[width], value)
        try:
            written = self.ops.pwrite(self.fd, data, self.file_offset + off)
        except OSError as e:
            raise TransportError(f"writing {self.name} at {off:#x} failed: "
                                 f"{e.strerror or e}", e.errno or errno.EIO) from None
        if written != width:
            raise TransportError(f"writing {self.name} at {off:#x}: short write")


class MmioKicker:
    """Kicks by storing the queue index into its notify slot: one 16-bit store."""

    __slots__ = ("slot", "value")

    def __init__(self, slot: memoryview, value: int) -> None:
        self.slot = slot
        self.value = value

    def kick(self) -> None:
        try:
            self.slot[0] = self.value
        except ValueError:
            pass   # the session closed (the view is released): recovery resubmits

    def disarm(self) -> None:
        slot, self.slot = self.slot, memoryview(bytearray(2)).cast("H")
        slot.release()


class FileKicker:
    """Kicks with a 2-byte pwrite at the notify address (a BAR that cannot be mmapped)."""

    __slots__ = ("ops", "fd", "offset", "data")

    def __init__(self, ops: VfioOps, fd: int, offset: int, value: int) -> None:
        self.ops = ops
        self.fd = fd
        self.offset = offset
        self.data = struct.pack("<H", value)

    def kick(self) -> None:
        try:
            self.ops.pwrite(self.fd, self.data, self.offset)
        except OSError:
            pass   # the session closed: recovery resubmits

    def disarm(self) -> None:
        self.fd = -1


class CommonCfg:
    """struct virtio_pci_common_cfg (4.1.4.3) through a Window: named fields, 64-bit ones
    written as two 32-bit halves, low first."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30

    def __init__(self, window: Window) -> None:
        self.w = window

    def device_features(self) -> int:
        self.w.write(self.DEVICE_FEATURE_SELECT, 4, 0)
        low = self.w.read(self.DEVICE_FEATURE, 4)
        self.w.write(self.DEVICE_FEATURE_SELECT, 4, 1)
        return self.w.read(self.DEVICE_FEATURE, 4) << 32 | low

    def set_driver_features(self, features: int) -> None:
        for half in (0, 1):
            self.w.write(self.DRIVER_FEATURE_SELECT, 4, half)
            self.w.write(self.DRIVER_FEATURE, 4, features >> (32 * half) & 0xFFFFFFFF)

    @property
    def status(self) -> int:
        return self.w.read(self.DEVICE_STATUS, 1)

    @status.setter
    def status(self, value: int) -> None:
        self.w.write(self.DEVICE_STATUS, 1, value)

    @property
    def generation(self) -> int:
        return self.w.read(self.CONFIG_GENERATION, 1)

    @property
    def num_queues(self) -> int:
        return self.w.read(self.NUM_QUEUES, 2)

    def select(self, index: int) -> None:
        self.w.write(self.QUEUE_SELECT, 2, index)

    def read16(self, off: int) -> int:
        return self.w.read(off, 2)

    def write16(self, off: int, value: int) -> None:
        self.w.write(off, 2, value)

    def write64(self, off: int, value: int) -> None:
        self.w.write(off, 4, value & 0xFFFFFFFF)
        self.w.write(off + 4, 4, value >> 32 & 0xFFFFFFFF)

    def set_vector(self, off: int, vector: int) -> int:
        """Write an MSI-X vector field (config or selected queue); return what reads back
        (VIRTIO_MSI_NO_VECTOR if the device refused it)."""
        self.w.write(off, 2, vector)
        return self.w.read(off, 2)
