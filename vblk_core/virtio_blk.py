"""virtio-blk (virtio 1.x, section 5.2): feature bits, request slot, config space, status codes."""
from __future__ import annotations

import ctypes
import enum
import errno
import struct
from dataclasses import dataclass

from .errors import DeviceError, RequestError
from .layout import MAX_QUEUE_SIZE
from .virtio import VirtioFeature

SECTOR_SIZE = 512



class BlkFeature(enum.IntFlag):
    """virtio-blk feature bits (section 5.2.3), as masks of the 64-bit feature word."""
    SIZE_MAX = 1 << 1
    SEG_MAX = 1 << 2
    RO = 1 << 5
    BLK_SIZE = 1 << 6
    FLUSH = 1 << 9
    TOPOLOGY = 1 << 10
    CONFIG_WCE = 1 << 11
    MQ = 1 << 12
    DISCARD = 1 << 13
    WRITE_ZEROES = 1 << 14


#: What this driver understands and accepts when offered (virtio-blk and generic bits; each
#: transport adds its own, e.g. vhost-user's PROTOCOL_FEATURES or ACCESS_PLATFORM for PCI).
DRIVER_FEATURES = int(BlkFeature.SIZE_MAX | BlkFeature.SEG_MAX | BlkFeature.RO
                      | BlkFeature.BLK_SIZE | BlkFeature.FLUSH | BlkFeature.TOPOLOGY
                      | BlkFeature.CONFIG_WCE | BlkFeature.MQ | BlkFeature.DISCARD
                      | BlkFeature.WRITE_ZEROES) | int(VirtioFeature.EVENT_IDX
                                                       | VirtioFeature.VERSION_1)


class RequestType(enum.IntEnum):
    """virtio-blk request types (section 5.2.6)."""
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    DISCARD = 11
    WRITE_ZEROES = 13


#: How a request type reads in messages.
REQUEST_NAMES: dict[int, str] = {
    RequestType.IN: "read", RequestType.OUT: "write", RequestType.FLUSH: "flush",
    RequestType.GET_ID: "get-id", RequestType.DISCARD: "discard",
    RequestType.WRITE_ZEROES: "write-zeroes"}

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20

# Status
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2


class VirtioBlkReqSlot(ctypes.Structure):
    """Per-request data shared with the device, one per descriptor (at the head's index).

    The header is device-readable, the discard/write-zeroes segment device-readable, the status
    byte device-writable.  Each gets its own descriptor.
    """
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("ioprio", ctypes.c_uint32),
        ("sector", ctypes.c_uint64),
        ("seg_sector", ctypes.c_uint64),
        ("seg_num_sectors", ctypes.c_uint32),
        ("seg_flags", ctypes.c_uint32),
        ("status", ctypes.c_uint8),
    ]


HEADER_OFFSET = VirtioBlkReqSlot.type.offset
SEGMENT_OFFSET = VirtioBlkReqSlot.seg_sector.offset
STATUS_OFFSET = VirtioBlkReqSlot.status.offset
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")


def status_to_errno(status: int) -> int:
    """Map a virtio-blk status byte to an errno: OK 0, IOERR EIO, UNSUPP EOPNOTSUPP, else EPROTO."""
    if status == VIRTIO_BLK_S_OK:
        return 0
    if status == VIRTIO_BLK_S_IOERR:
        return errno.EIO
    if status == VIRTIO_BLK_S_UNSUPP:
        return errno.EOPNOTSUPP
    return errno.EPROTO


def status_error(status: int, what: str) -> RequestError:
    """The RequestError for a failed status byte."""
    names = {VIRTIO_BLK_S_IOERR: "I/O error", VIRTIO_BLK_S_UNSUPP: "unsupported"}
    name = names.get(status, f"invalid status {status}")
    return RequestError(f"{what}: device answered {name}", status_to_errno(status))


# struct virtio_blk_config, up to and including write_zeroes_may_unmap (60 bytes).
CONFIG_SIZE = 60
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
assert _CONFIG.size == CONFIG_SIZE

#: Largest capacity we believe (2^63 bytes, in sectors): anything above is nonsense.
MAX_CAPACITY_SECTORS = (1 << 63) // SECTOR_SIZE


@dataclass(frozen=True)
class BlockConfig:
    """The device's config space, validated, with the features that make fields meaningful.

    Sizes are in bytes.  ``max_transfer`` 0 means the device sets no limit (size_max absent).
    """
    capacity: int
    block_size: int
    size_max: int
    seg_max: int
    physical_block_exp: int
    min_io_size: int
    opt_io_size: int
    writeback: bool
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: bool

    @staticmethod
    def parse(data: bytes, features: int) -> BlockConfig:
        """Parse config space bytes given the negotiated ``features``.

        Raises DeviceError for a short buffer or values that make no sense (capacity 0 or
        above 2^63 bytes, block size not a power of two in 512..64 KiB, seg_max 0, ...).
        """
        if len(data) < 8:
            raise DeviceError(f"device config is {len(data)} bytes, need at least 8 (capacity)")
        data = bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\0")
        (capacity, size_max, seg_max, _cyl, _heads, _sectors, blk_size, phys_exp, _align_off,
         min_io, opt_io, wce, num_queues, max_discard, max_discard_seg,
         discard_align, max_wz, max_wz_seg, wz_may_unmap) = _CONFIG.unpack(data)

        def has(feature: BlkFeature) -> bool:
            return bool(features & feature)

        if capacity == 0:
            raise DeviceError("device reports capacity 0: nothing to serve (is the image empty?)")
        if capacity > MAX_CAPACITY_SECTORS:
            raise DeviceError(f"device reports an absurd capacity of {capacity} sectors")
        block_size = blk_size if has(BlkFeature.BLK_SIZE) else SECTOR_SIZE
        if block_size < SECTOR_SIZE or block_size > 65536 or block_size & (block_size - 1):
            raise DeviceError(f"device reports block size {block_size}: must be a power of two "
                              "from 512 to 65536")
        if capacity * SECTOR_SIZE % block_size:
            raise DeviceError(f"capacity {capacity * SECTOR_SIZE} is not a multiple of the "
                              f"block size {block_size}")
        if not has(BlkFeature.SIZE_MAX):
            size_max = 0
        elif size_max and size_max < 4096:
            # Linux rejects below a page too; we could not bound a request's segments sanely.
            raise DeviceError(f"device reports size_max {size_max}: below 4096 bytes")
        if not has(BlkFeature.SEG_MAX):
            seg_max = 1
        elif seg_max == 0:
            raise DeviceError("device reports seg_max 0: no request could carry data")
        if not has(BlkFeature.TOPOLOGY):
            phys_exp, min_io, opt_io = 0, 1, 0
        elif phys_exp > 16:
            raise DeviceError(f"device reports physical_block_exp {phys_exp}: absurd")
        if not has(BlkFeature.MQ):
            num_queues = 1
        elif num_queues == 0:
            raise DeviceError("device offers MQ but reports num_queues 0")
        if has(BlkFeature.DISCARD):
            if max_discard == 0 or max_discard_seg == 0:
                raise DeviceError("device offers DISCARD with a zero max_discard_sectors/seg")
        else:
            max_discard, max_discard_seg, discard_align = 0, 0, 0
        if has(BlkFeature.WRITE_ZEROES):
            if max_wz == 0 or max_wz_seg == 0:
                raise DeviceError("device offers WRITE_ZEROES with a zero "
                                  "max_write_zeroes_sectors/seg")
        else:
            max_wz, max_wz_seg, wz_may_unmap = 0, 0, 0
        return BlockConfig(
            capacity=capacity * SECTOR_SIZE, block_size=block_size, size_max=size_max,
            seg_max=seg_max, physical_block_exp=phys_exp, min_io_size=min_io * block_size,
            opt_io_size=opt_io * block_size,
            writeback=bool(wce) if has(BlkFeature.CONFIG_WCE) else has(BlkFeature.FLUSH),
            num_queues=num_queues, max_discard_sectors=max_discard,
            max_discard_seg=max_discard_seg, discard_sector_alignment=discard_align,
            max_write_zeroes_sectors=max_wz, max_write_zeroes_seg=max_wz_seg,
            write_zeroes_may_unmap=bool(wz_may_unmap))


#: A data request needs 3 descriptors (header, data, status), so smaller rings carry nothing.
MIN_QUEUE_SIZE = 4


def queue_size_problem(size: object) -> str | None:
    """None if ``size`` is a usable virtqueue size for this driver, else what to do instead.
    The one rule for the plugin's queue-size= and the block device."""
    if (isinstance(size, int) and not isinstance(size, bool)
            and MIN_QUEUE_SIZE <= size <= MAX_QUEUE_SIZE and not size & (size - 1)):
        return None
    return f"use a power of two from {MIN_QUEUE_SIZE} to {MAX_QUEUE_SIZE} (default 256)"
