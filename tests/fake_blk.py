"""The tests' one virtio-blk device (virtio 1.x, 5.2), behind every fake transport: the
vhost-user back-end (fake_vhost_user.py), the vDPA device (fake_vdpa.py), the PCI function
behind VFIO (fake_vfio.py) and the in-process back-end (fake_ring_device.FakeVhostBackend) are
each a ``BlkDevice``, and serve their queues with fake_ring_device's ``BlkEmulator``.

``BlkDevice`` is a bytearray ``disk``, a 60-byte config space and the features it offers (and
those the driver acked).  It is written from the specs, independently of vblk_core.  What the
*driver* does wrong (a malformed chain, a descriptor longer than size_max, more data
descriptors than seg_max, more discard/write-zeroes segments or sectors than the config allows,
a request not aligned to the block size, a FLUSH/DISCARD/WRITE_ZEROES whose feature was not
acked, a write to a read-only device) is recorded in ``violations`` (and ``errors``), so a test
of a healthy device checks the driver too.  Every request served is recorded in ``served`` (a
``BlkRequest``) before its completion is published: once a caller has its answer, the requests
that served it are there.

Misbehaviour, per request: ``policy(request) -> Behaviour | None``; ``raw_hook(queue, ring,
chain) -> bool`` (True: it answered, or kept, the chain itself); and one named fault,
``io_fault``, injected ``io_fault_count`` times (None: forever) from the first request it
applies to whose number (counted from 0 over the device's life and all its queues) is at least
``io_fault_at`` ("short_read" applies to reads only; "replay" needs an earlier completion on
the queue):
    "id_out_of_range"    the used entry names descriptor queue_size + 7
    "double_complete"    serve it, then publish its id twice in one used-idx update
    "replay"             don't serve it; publish the previous completion's id and len again
    "len_too_big"        report 4096 bytes more than the chain lets the device write
    "short_read"         for IN: write only ``short_bytes`` of data, report short_bytes + 1,
                         status OK (the rest of the buffer keeps whatever was there)
    "bad_status"         serve it, write status ``bad_status`` (default 7)
    "no_status"          serve it, report the full length, never write the status byte
    "used_idx_jump"      serve it, then move used idx by 1000 (in the same store)
    "drop"               consume it and never complete it
    "disconnect"         raise Disconnect (it stays in flight): the transport drops the driver
    "vanish"             the same; the vhost-user fake also stops listening for good
    "resize_memory"      before serving it, ``attack_memory()``: a transport that holds the
                         driver's memory file attacks it (the vhost-user fake does)
Each device counts what it injected in ``injected``, the module all of them in ``INJECTED``.
"""
from __future__ import annotations

import collections
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from fake_ring import Chain, Desc, FakeRing

BLK_HEADER = struct.Struct("<IIQ")
BLK_SEGMENT = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
REQUEST_KINDS = {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_GET_ID: "get_id",
                 T_DISCARD: "discard", T_WRITE_ZEROES: "write_zeroes"}
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WZ_FLAG_UNMAP = 1
SECTOR = 512
SERIAL = b"fake-blk\0"    # GET_ID's answer (a NUL ends it before the 20 bytes)

# Feature bits (virtio 1.x / virtio-blk)
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_MQ = (
    1, 2, 5, 6, 9, 10, 11, 12)
F_DISCARD, F_WRITE_ZEROES, F_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1 = 13, 14, 29, 30, 32
#: Features qemu-storage-daemon 7.2 offers (writable export).
QSD_FEATURES = 0x175007e46

IO_FAULTS = ("id_out_of_range", "double_complete", "replay", "len_too_big", "short_read",
             "bad_status", "no_status", "used_idx_jump", "drop", "disconnect", "vanish",
             "resize_memory")
#: every fault injected by any fake in this process, by kind
INJECTED: collections.Counter[str] = collections.Counter()

# --- config space (virtio 1.2, 5.2.4), packed field by field ---------------------------------

CONFIG_FIELDS = {  # name: (offset, struct format)
    "capacity": (0, "<Q"), "size_max": (8, "<I"), "seg_max": (12, "<I"),
    "cylinders": (16, "<H"), "heads": (18, "<B"), "sectors": (19, "<B"),
    "blk_size": (20, "<I"), "physical_block_exp": (24, "<B"), "alignment_offset": (25, "<B"),
    "min_io_size": (26, "<H"), "opt_io_size": (28, "<I"), "writeback": (32, "<B"),
    "num_queues": (34, "<H"), "max_discard_sectors": (36, "<I"), "max_discard_seg": (40, "<I"),
    "discard_sector_alignment": (44, "<I"), "max_write_zeroes_sectors": (48, "<I"),
    "max_write_zeroes_seg": (52, "<I"), "write_zeroes_may_unmap": (56, "<B"),
}
CONFIG_LEN = 60


def blk_config(**fields: int) -> bytes:
    """60 bytes of virtio_blk_config with the given fields set (others 0).  Raises KeyError
    for a field that does not exist."""
    buf = bytearray(CONFIG_LEN)
    for name, value in fields.items():
        off, fmt = CONFIG_FIELDS[name]
        struct.pack_into(fmt, buf, off, value)
    return bytes(buf)


def qsd_like_config(capacity_bytes: int = 64 << 20, num_queues: int = 1,
                    **overrides: int) -> bytes:
    """The config qemu-storage-daemon 7.2 reports (see docs/vhost-user-blk-facts.md), with
    ``overrides`` (capacity in sectors, blk_size, seg_max, ...)."""
    fields = dict(capacity=capacity_bytes // SECTOR, size_max=0, seg_max=126, blk_size=512,
                  min_io_size=1, opt_io_size=1, num_queues=num_queues,
                  max_discard_sectors=32768, max_discard_seg=1, discard_sector_alignment=1,
                  max_write_zeroes_sectors=32768, max_write_zeroes_seg=1)
    return blk_config(**{**fields, **overrides})


# --- requests --------------------------------------------------------------------------------

@dataclass
class BlkRequest:
    """A virtio-blk request as the device took it from a chain."""
    queue: int
    chain: Chain
    type: int                 # T_IN, T_OUT, ...
    sector: int               # the header's sector
    length: int               # read/get_id: bytes the device may write; else bytes sent
    segments: tuple[tuple[int, int, int], ...] = ()   # discard/write_zeroes: (sector, n, flags)
    answer: int | None = None     # the status byte written (None: none)

    @property
    def kind(self) -> str:
        """read, write, flush, get_id, discard, write_zeroes, other"""
        return REQUEST_KINDS.get(self.type, "other")

    @property
    def status(self) -> Desc:
        """The descriptor holding the status byte (the chain's last)."""
        return self.chain.descs[-1]

    @property
    def data(self) -> list[Desc]:
        """The descriptors carrying data: all but a 16-byte header first and a 1-byte status
        last (any other framing counts the header's and status's descriptors as data)."""
        descs = self.chain.descs
        first = 1 if descs and not descs[0].writable and descs[0].len == BLK_HEADER.size else 0
        last = 1 if len(descs) > first and descs[-1].writable and descs[-1].len == 1 else 0
        return descs[first:len(descs) - last]

    @property
    def data_descriptors(self) -> int:
        return len(self.data)

    @property
    def longest_descriptor(self) -> int:
        return max(d.len for d in self.chain.descs)

    @property
    def segment(self) -> tuple[int, int, int] | None:
        return self.segments[0] if self.segments else None

    @property
    def unmap(self) -> bool:
        """A write-zeroes that lets the device deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)."""
        return any(flags & WZ_FLAG_UNMAP for _s, _n, flags in self.segments)

    @property
    def extents(self) -> list[tuple[int, int]]:
        """(byte offset, byte length) the request covers: its data, or its segments."""
        if self.segments:
            return [(s * SECTOR, n * SECTOR) for s, n, _f in self.segments]
        if self.type in (T_IN, T_OUT):
            return [(self.sector * SECTOR, self.length)]
        return []

    def __str__(self) -> str:
        where = ",".join(f"{o}+{n}" for o, n in self.extents)
        return f"{self.kind}({where}{' unmap' if self.unmap else ''})"


@dataclass
class Behaviour:
    """How the device answers one request; the defaults are honest."""
    status: int | None = None          # status byte to write instead of the honest one
    write_status: bool = True          # False: leave the status byte alone
    used_len: int | None = None        # length to report instead of the honest one
    data_fill: int | None = None       # fill the writable data with this byte
    data_bytes: int | None = None      # write only this much of a read's data (and report it)
    used_id: int | None = None         # id to publish instead of the chain's head
    repeat: int = 1                    # publish the used entry this many times
    idx_jump: int = 0                  # then move used idx this much further, in one store


Policy = Callable[[BlkRequest], Behaviour | None]
RawHook = Callable[[int, FakeRing, Chain], bool]


class Disconnect(Exception):
    """The "disconnect" or "vanish" fault: the transport drops the driver now (args[0])."""


class BlkDevice:
    """One virtio-blk device on ``disk`` (whose length is a multiple of 512): ``config`` (default
    qemu-storage-daemon's for its size) and the ``features`` it offers; the features acked are
    all of them until a transport calls ``ack_features``.  Faults and records: see the module's
    docstring."""

    def __init__(self, disk: bytearray, config: bytes | None = None, *,
                 features: int = QSD_FEATURES, policy: Policy | None = None,
                 raw_hook: RawHook | None = None, serial: bytes = SERIAL,
                 io_fault: str | None = None, io_fault_at: int = 0,
                 io_fault_count: int | None = 1, short_bytes: int = 0, bad_status: int = 7,
                 signal_always: bool = False) -> None:
        assert len(disk) % SECTOR == 0
        assert io_fault is None or io_fault in IO_FAULTS, io_fault
        self.disk = disk
        self.config = bytes(config) if config is not None else qsd_like_config(len(disk))
        self.features = features
        self.acked = features
        self.policy = policy
        self.raw_hook = raw_hook
        self.serial = serial
        self.io_fault, self.io_fault_at, self.io_fault_count = io_fault, io_fault_at, io_fault_count
        self.short_bytes = short_bytes
        self.bad_status_value = bad_status
        self.signal_always = signal_always
        self.lock = threading.Lock()       # held while a chain is answered (hooks swap under it)
        self._fence = threading.Lock()     # a full barrier between ring stores and loads
        self.served: list[BlkRequest] = []
        self.violations: list[str] = []
        self.errors: list[object] = []     # the violations and the device threads' exceptions
        self.injected: collections.Counter[str] = collections.Counter()
        self.ops: collections.Counter[str] = collections.Counter()
        self.requests = 0                  # taken from avail rings
        self.completed = 0                 # used entries published

    # --- what the transports call --------------------------------------------------------

    def ack_features(self, value: int) -> int:
        """The driver acked ``value``; a bit not offered is a violation."""
        if value & ~self.features:
            self.violation(f"features {value:#x} acked, {value & ~self.features:#x} not offered")
        self.acked = value
        return value

    def acked_bit(self, bit: int) -> bool:
        return bool(self.acked >> bit & 1)

    @property
    def read_only(self) -> bool:
        return bool(self.features >> F_RO & 1)

    def inject(self, kind: str) -> None:
        self.injected[kind] += 1
        INJECTED[kind] += 1

    def violation(self, what: str) -> None:
        self.violations.append(what)
        self.errors.append(what)

    def attack_memory(self) -> None:
        """The "resize_memory" fault, before the request is served: a transport that holds
        the driver's memory file attacks it here.  (Nothing to attack by default.)"""

    def barrier(self) -> None:
        self._fence.acquire()
        self._fence.release()

    def config_field(self, name: str) -> int:
        off, fmt = CONFIG_FIELDS[name]
        return int(struct.unpack_from(fmt, self.config, off)[0])

    def block_size(self) -> int:
        return (self.config_field("blk_size") or SECTOR) if self.acked_bit(F_BLK_SIZE) else SECTOR

    def fault_due(self, number: int) -> str | None:
        """The named fault request ``number`` is to get, if any (injected when applied)."""
        if self.io_fault is None or number < self.io_fault_at:
            return None
        if self.io_fault_count is not None and self.injected[self.io_fault] >= self.io_fault_count:
            return None
        return self.io_fault

    # --- one request ---------------------------------------------------------------------

    def parse(self, queue: int, ring: FakeRing, chain: Chain) -> tuple[BlkRequest | None, bytes]:
        """The request a chain carries and the bytes it sends after the header; (None, b"")
        for a chain too short to be one (a violation).  Raises RingFault for a buffer the
        device cannot reach."""
        out = b"".join(ring.read(d.addr, d.len) for d in chain.readable())
        in_len = chain.writable_bytes
        if len(out) < BLK_HEADER.size or in_len < 1:
            self.violation(f"queue {queue}: request at {chain.head} has {len(out)} readable and "
                           f"{in_len} writable bytes")
            return None, b""
        rtype, _prio, sector = BLK_HEADER.unpack_from(out)
        body = out[BLK_HEADER.size:]
        segments: tuple[tuple[int, int, int], ...] = ()
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            whole = len(body) - len(body) % BLK_SEGMENT.size
            segments = tuple(BLK_SEGMENT.unpack_from(body, k)
                             for k in range(0, whole, BLK_SEGMENT.size))
        length = in_len - 1 if rtype in (T_IN, T_GET_ID) else len(body)
        return BlkRequest(queue, chain, rtype, sector, length, segments), body

    def execute(self, req: BlkRequest, body: bytes) -> tuple[int, bytes]:
        """Do ``req`` on the disk, checking what the driver may send: (status, data for the
        driver)."""
        q, kind, disk = req.queue, req.kind, self.disk
        self.ops[kind] += 1
        self._check_limits(req)
        bs = self.block_size()
        needs = {T_FLUSH: F_FLUSH, T_DISCARD: F_DISCARD, T_WRITE_ZEROES: F_WRITE_ZEROES}
        start = req.sector * SECTOR
        if req.type in needs and not self.acked_bit(needs[req.type]):
            self.violation(f"queue {q}: {kind} request, but the feature was not negotiated")
            return S_UNSUPP, b""
        if req.type in (T_IN, T_OUT) and (start % bs or req.length % bs):
            self.violation(f"queue {q}: {kind} at sector {req.sector} of {req.length} bytes is "
                           f"not aligned to the block size {bs}")
            return S_IOERR, b""
        if req.type in (T_OUT, T_DISCARD, T_WRITE_ZEROES) and self.read_only:
            self.violation(f"queue {q}: {kind} on a read-only device")
            return S_IOERR, b""
        if req.type == T_IN:
            if req.length % SECTOR or start + req.length > len(disk) or body:
                return S_IOERR, b""
            return S_OK, bytes(disk[start:start + req.length])
        if req.type == T_OUT:
            if (len(body) % SECTOR or start + len(body) > len(disk)
                    or req.chain.writable_bytes != 1):
                return S_IOERR, b""
            disk[start:start + len(body)] = body
            return S_OK, b""
        if req.type == T_FLUSH:
            return S_OK, b""
        if req.type == T_GET_ID:
            return S_OK, self.serial[:req.length]
        if req.type in (T_DISCARD, T_WRITE_ZEROES):
            limit, limit_segs = (self.config_field(f"max_{kind}_sectors"),
                                 self.config_field(f"max_{kind}_seg"))
            if (not body or len(body) % BLK_SEGMENT.size
                    or not self._check_segments(req, limit, limit_segs)
                    or any((s + n) * SECTOR > len(disk) for s, n, _f in req.segments)):
                return S_IOERR, b""
            for s, n, _f in req.segments:
                disk[s * SECTOR:(s + n) * SECTOR] = bytes(n * SECTOR)
            return S_OK, b""
        return S_UNSUPP, b""

    def _check_limits(self, req: BlkRequest) -> None:
        """A descriptor longer than size_max, more data descriptors than seg_max (each when
        negotiated) are violations."""
        size_max, seg_max = self.config_field("size_max"), self.config_field("seg_max")
        if self.acked_bit(F_SIZE_MAX) and size_max and req.longest_descriptor > size_max:
            self.violation(f"queue {req.queue}: {req.kind} has a {req.longest_descriptor}-byte "
                           f"descriptor, more than size_max {size_max}")
        if (self.acked_bit(F_SEG_MAX) and req.type in (T_IN, T_OUT)
                and req.data_descriptors > seg_max):
            self.violation(f"queue {req.queue}: {req.kind} has {req.data_descriptors} data "
                           f"descriptors, more than seg_max {seg_max}")

    def _check_segments(self, req: BlkRequest, limit_sectors: int, limit_segs: int) -> bool:
        """Discard / write-zeroes segments: count, size, flags and alignment as the config
        allows.  Records violations; returns False if the request must fail."""
        q, kind, ok = req.queue, req.kind, True
        if len(req.segments) > limit_segs:
            self.violation(f"queue {q}: {kind} with {len(req.segments)} segments, more than "
                           f"{limit_segs}")
            ok = False
        bs = self.block_size()
        for s, n, flags in req.segments:
            if n > limit_sectors:
                self.violation(f"queue {q}: {kind} of {n} sectors, more than {limit_sectors}")
                ok = False
            if (s * SECTOR) % bs or (n * SECTOR) % bs:
                self.violation(f"queue {q}: {kind} at sector {s}+{n} is not aligned to the "
                               f"block size {bs}")
                ok = False
            if flags & ~(WZ_FLAG_UNMAP if req.type == T_WRITE_ZEROES else 0):
                self.violation(f"queue {q}: {kind} segment flags {flags:#x}")
        return ok

    def behaviour(self, req: BlkRequest, status: int, fault: str | None,
                  queue_size: int) -> Behaviour | None:
        """The named ``fault`` as a Behaviour where it applies to ``req`` (counted as
        injected), else the policy's."""
        named = {"bad_status": Behaviour(status=self.bad_status_value),
                 "no_status": Behaviour(write_status=False),
                 "id_out_of_range": Behaviour(used_id=queue_size + 7),
                 "len_too_big": Behaviour(used_len=req.chain.writable_bytes + 4096),
                 "double_complete": Behaviour(repeat=2),
                 "used_idx_jump": Behaviour(idx_jump=1000)}
        if fault == "short_read" and req.type == T_IN and status == S_OK:
            named[fault] = Behaviour(data_bytes=self.short_bytes)
        if fault in named:
            self.inject(fault)
            return named[fault]
        return self.policy(req) if self.policy else None
