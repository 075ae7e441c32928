"""A fake device side for split virtqueues, for unit tests: no sockets, no daemon.

``FakeRing`` reads the descriptor table and available ring straight from the memory the driver
writes and writes the used ring, as a real back-end would, and it can misbehave on demand
(raw used entries, arbitrary used idx, avail_event, NO_NOTIFY).  It is written from the virtio
1.x spec (section 2.7), independently of vblk_core.virtqueue: the only things it shares with the
driver are the memory and the layout offsets.

``BlkEmulator`` gives chains virtio-blk meaning (header, data, status) against a bytearray disk,
with hooks to return a short length, a bad status, or no status at all.

``FakeVhostBackend`` is a ``vblk_core.transport.Connector`` whose transports serve a whole
``BlockDevice`` with ``BlockEmulator``s: each maps the memfd handed to map_memory like a real
back-end, and serves each queue on a thread that waits on its kick eventfd and signals the
call eventfd.
"""
from __future__ import annotations

import mmap
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vblk_core.transport import Transport

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
F_NEXT = 1
F_WRITE = 2
USED_F_NO_NOTIFY = 1

BLK_HEADER = struct.Struct("<IIQ")
BLK_SEGMENT = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2


@dataclass(frozen=True)
class Desc:
    index: int
    addr: int
    len: int
    flags: int
    next: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & F_WRITE)


@dataclass
class Chain:
    head: int
    descs: list[Desc]

    @property
    def writable_bytes(self) -> int:
        return sum(d.len for d in self.descs if d.writable)

    def readable(self) -> list[Desc]:
        return [d for d in self.descs if not d.writable]

    def writable(self) -> list[Desc]:
        return [d for d in self.descs if d.writable]


class RingFault(Exception):
    """The driver published something a device must reject (loop, bad index, bad address)."""


class FakeRing:
    """The device side of one split virtqueue.

    ``mem`` is a buffer holding the ring at ``desc_off``/``avail_off``/``used_off`` (byte offsets)
    and, for data, the guest-physical range starting at ``guest_base`` (mem[0]).
    """

    def __init__(self, mem, size: int, desc_off: int, avail_off: int, used_off: int,
                 guest_base: int) -> None:
        self.mem = memoryview(mem).cast("B") if not isinstance(mem, memoryview) else mem
        self.size = size
        self.desc_off = desc_off
        self.avail_off = avail_off
        self.used_off = used_off
        self.guest_base = guest_base
        # Ring indexes and event words are accessed as whole 16-bit words, as a real device
        # does (a bytewise store could be seen torn by the driver running on another thread).
        for off in (avail_off, used_off):
            if off % 2:
                raise RingFault(f"ring offset {off} is not 2-byte aligned")
        self._w = self.mem[:len(self.mem) // 2 * 2].cast("H")
        self.last_avail = 0   # next avail entry to consume (free-running u16)
        self.used_idx = 0     # our used idx (free-running u16)

    @classmethod
    def from_layout(cls, mem, offset: int, layout, guest_base: int) -> FakeRing:
        return cls(mem, layout.queue_size, offset, offset + layout.avail_offset,
                   offset + layout.used_offset, guest_base)

    # --- guest memory ----------------------------------------------------------------------

    def _off(self, addr: int, length: int) -> int:
        off = addr - self.guest_base
        if off < 0 or off + length > len(self.mem):
            raise RingFault(f"guest address {addr:#x}+{length} outside memory")
        return off

    def read(self, addr: int, length: int) -> bytes:
        off = self._off(addr, length)
        return bytes(self.mem[off:off + length])

    def write(self, addr: int, data: bytes) -> None:
        off = self._off(addr, len(data))
        self.mem[off:off + len(data)] = data

    # --- driver-written structures ---------------------------------------------------------

    def desc(self, i: int) -> Desc:
        addr, length, flags, nxt = DESC.unpack_from(self.mem, self.desc_off + 16 * i)
        return Desc(i, addr, length, flags, nxt)

    def release(self) -> None:
        """Drop the views on the memory (so its owner can unmap it)."""
        self._w.release()

    @property
    def avail_flags(self) -> int:
        return self._w[self.avail_off // 2]

    @property
    def avail_idx(self) -> int:
        return self._w[self.avail_off // 2 + 1]

    @property
    def used_event(self) -> int:
        return self._w[self.avail_off // 2 + 2 + self.size]

    @property
    def avail_event(self) -> int:
        return self._w[self.used_off // 2 + 2 + 4 * self.size]

    def pending(self) -> int:
        return (self.avail_idx - self.last_avail) & 0xFFFF

    def walk(self, head: int) -> Chain:
        if head >= self.size:
            raise RingFault(f"avail ring names descriptor {head} (queue size {self.size})")
        descs, i = [], head
        while True:
            d = self.desc(i)
            descs.append(d)
            if not d.flags & F_NEXT:
                return Chain(head, descs)
            if len(descs) >= self.size or d.next >= self.size:
                raise RingFault(f"descriptor chain from {head} loops or leaves the table")
            i = d.next

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        if self.pending() == 0:
            return None
        head = self._w[self.avail_off // 2 + 2 + self.last_avail % self.size]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.walk(head)

    def pop_all(self) -> list[Chain]:
        chains = []
        while (c := self.pop()) is not None:
            chains.append(c)
        return chains

    # --- device-written structures ---------------------------------------------------------

    def put_used_elem(self, pos: int, head: int, length: int) -> None:
        """Raw: write used ring entry ``pos`` (taken modulo the size), idx untouched."""
        USED_ELEM.pack_into(self.mem, self.used_off + 4 + 8 * (pos % self.size), head, length)

    def set_used_idx(self, value: int) -> None:
        """Raw: publish ``value`` as the used idx (and adopt it as ours)."""
        self.used_idx = value & 0xFFFF
        self._w[self.used_off // 2 + 1] = self.used_idx

    def push(self, head: int, length: int, publish: bool = True) -> None:
        """Append a used entry; with ``publish`` make it visible (write used idx)."""
        self.put_used_elem(self.used_idx, head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self) -> None:
        self._w[self.used_off // 2 + 1] = self.used_idx

    def set_used_flags(self, flags: int) -> None:
        self._w[self.used_off // 2] = flags

    def set_avail_event(self, value: int) -> None:
        self._w[self.used_off // 2 + 2 + 4 * self.size] = value & 0xFFFF


# --- virtio-blk semantics ----------------------------------------------------------------------

@dataclass
class BlkRequest:
    """A parsed virtio-blk chain."""
    chain: Chain
    type: int
    sector: int
    segment: tuple[int, int, int] | None
    data: list[Desc]          # the data descriptors (between header/segment and status)
    status: Desc

    @property
    def data_len(self) -> int:
        return sum(d.len for d in self.data)


@dataclass
class Behaviour:
    """How BlkEmulator answers one request; None = behave correctly."""
    status: int | None = None          # status byte to write instead of the honest one
    write_status: bool = True          # False: leave the status byte alone
    used_len: int | None = None        # length to report instead of the honest one
    data_fill: int | None = None       # for reads: fill the data buffer with this byte


class BlkEmulator:
    """Answers virtio-blk chains popped from a FakeRing, against ``disk``.

    ``policy(req) -> Behaviour | None`` may make any request misbehave.
    """

    def __init__(self, ring: FakeRing, disk: bytearray,
                 policy: Callable[[BlkRequest], Behaviour | None] | None = None,
                 serial: bytes = b"fake-blk") -> None:
        self.ring = ring
        self.disk = disk
        self.policy = policy
        self.serial = serial
        self.log: list[BlkRequest] = []

    def parse(self, chain: Chain) -> BlkRequest:
        descs = chain.descs
        if len(descs) < 2 or descs[0].writable or descs[0].len != BLK_HEADER.size:
            raise RingFault(f"chain {chain.head} has no 16-byte readable header: {descs}")
        status = descs[-1]
        if not status.writable or status.len != 1:
            raise RingFault(f"chain {chain.head} does not end in a 1-byte status: {descs}")
        rtype, _prio, sector = BLK_HEADER.unpack(self.ring.read(descs[0].addr, BLK_HEADER.size))
        rest = descs[1:-1]
        segment = None
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            if not rest or rest[0].writable or rest[0].len != BLK_SEGMENT.size:
                raise RingFault(f"chain {chain.head}: discard/write-zeroes without a segment")
            segment = BLK_SEGMENT.unpack(self.ring.read(rest[0].addr, BLK_SEGMENT.size))
            rest = rest[1:]
        return BlkRequest(chain, rtype, sector, segment, rest, status)

    def execute(self, req: BlkRequest) -> tuple[int, int]:
        """Do the request honestly: returns (status, used_len)."""
        disk, ring = self.disk, self.ring
        if req.type == T_IN:
            pos = req.sector * 512
            if pos + req.data_len > len(disk):
                return S_IOERR, 1
            for d in req.data:
                ring.write(d.addr, bytes(disk[pos:pos + d.len]))
                pos += d.len
            return S_OK, req.data_len + 1
        if req.type == T_OUT:
            pos = req.sector * 512
            if pos + req.data_len > len(disk):
                return S_IOERR, 1
            for d in req.data:
                disk[pos:pos + d.len] = ring.read(d.addr, d.len)
                pos += d.len
            return S_OK, 1
        if req.type == T_FLUSH:
            return S_OK, 1
        if req.type == T_GET_ID:
            ident = self.serial[:req.data_len]
            ring.write(req.data[0].addr, ident)
            return S_OK, len(ident) + 1
        if req.type in (T_DISCARD, T_WRITE_ZEROES):
            assert req.segment is not None, "checked when the chain was parsed"
            sector, count, _flags = req.segment
            if (sector + count) * 512 > len(disk):
                return S_IOERR, 1
            disk[sector * 512:(sector + count) * 512] = bytes(count * 512)
            return S_OK, 1
        return S_UNSUPP, 1

    def serve(self, chain: Chain) -> tuple[int, int]:
        """Answer one chain (writes data and status, pushes the used entry)."""
        req = self.parse(chain)
        self.log.append(req)
        status: int | None
        status, used_len = self.execute(req)
        b = self.policy(req) if self.policy else None
        if b is not None:
            if b.data_fill is not None:
                for d in req.data:
                    if d.writable:
                        self.ring.write(d.addr, bytes([b.data_fill]) * d.len)
            if b.status is not None:
                status = b.status
            if b.used_len is not None:
                used_len = b.used_len
            if not b.write_status:
                status = None
        if status is not None:
            self.ring.write(req.status.addr, bytes([status]))
        self.ring.push(chain.head, used_len)
        return (status if status is not None else -1), used_len

    def serve_all(self) -> int:
        n = 0
        while (c := self.ring.pop()) is not None:
            self.serve(c)
            n += 1
        return n


# --- a fake vhost-user back-end for BlockDevice ----------------------------------------------

@dataclass
class FakeConfig:
    """What the fake back-end offers."""
    features: int
    config: bytes
    num_queues: int = 1
    protocol_features: int = (1 << 0) | (1 << 3) | (1 << 9)


class FakeVhostBackend:
    """A Connector for ``BlockDevice.open(backend)``: every connect() is a new fake session.
    Serves every queue with a BlkEmulator on ``disk``; ``policy`` as for BlkEmulator.
    ``stop()`` ends the service threads (also done by the session's close())."""

    target = "fake device"

    def __init__(self, offer: FakeConfig, disk: bytearray,
                 policy: Callable[[BlkRequest], Behaviour | None] | None = None,
                 raw_hook: Callable[[int, FakeRing, Chain], bool] | None = None) -> None:
        self.offer = offer
        self.disk = disk
        self.policy = policy
        self.raw_hook = raw_hook     # (queue, ring, chain) -> True if it answered the chain itself
        self.lock = threading.Lock()
        self.sessions: list[_FakeSession] = []
        self.errors: list[BaseException] = []

    def connect(self) -> _FakeSession:
        s = _FakeSession(self)
        self.sessions.append(s)
        return s

    def stop(self) -> None:
        for s in self.sessions:
            s.close()


class _FakeSession(Transport):
    target = "fake device"

    def __init__(self, backend: FakeVhostBackend) -> None:
        self.backend = backend
        self._rfd, self._wfd = os.pipe()      # never readable: stands in for the control socket
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        self._map: mmap.mmap | None = None
        self._memory = None
        self._threads: list[threading.Thread] = []
        self.rings: dict[int, FakeRing] = {}
        self.closed = False

    # the Transport surface BlockDevice uses

    def negotiate(self, driver_features: int) -> int:
        return self.backend.offer.features & driver_features

    def read_config(self, size: int) -> bytes:
        return self.backend.offer.config[:size]

    @property
    def max_queues(self) -> int:
        return self.backend.offer.num_queues

    def map_memory(self, memory) -> int:
        self._memory = memory
        self._map = mmap.mmap(memory.fd, memory.size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        return memory.user_addr

    def setup_queue(self, index, size, desc_addr, avail_addr, used_addr, call_fd):
        base = self._memory.user_addr
        ring = FakeRing(memoryview(self._map), size, desc_addr - base, avail_addr - base,
                        used_addr - base, base)
        self.rings[index] = ring
        kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        t = threading.Thread(target=self._serve, args=(index, ring, os.dup(call_fd), kick_fd),
                             name=f"fake-vhost-q{index}", daemon=True)
        self._threads.append(t)
        t.start()
        return _Kicker(kick_fd)

    def start(self) -> None:
        pass

    def loss_fd(self) -> int:
        return self._rfd

    def loss_reason(self) -> str | None:
        return "the back-end closed the vhost-user connection" if self.closed else None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        os.eventfd_write(self._stop, 1)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(5)
        for fd in (self._rfd, self._wfd, self._stop):
            os.close(fd)
        for ring in self.rings.values():
            ring.release()
            ring.mem.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass

    # the device

    def _serve(self, index: int, ring: FakeRing, call_fd: int, kick_fd: int) -> None:
        serve_queue(self.backend, index, ring, call_fd, kick_fd, self._stop)


def serve_queue(backend: FakeVhostBackend, index: int, ring: FakeRing, call_fd: int,
                kick_fd: int, stop_fd: int) -> None:
    """Serve queue ``index`` until ``stop_fd`` is signalled: wait for a kick, answer every
    available chain (``backend``'s raw_hook first, else a BlkEmulator on its disk), signal
    ``call_fd``.  Closes call_fd and kick_fd at the end; errors go to backend.errors."""
    emu = BlkEmulator(ring, backend.disk, backend.policy)
    poller = select.poll()
    poller.register(kick_fd, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    try:
        while True:
            events = dict(poller.poll())
            if stop_fd in events:
                return
            try:
                os.eventfd_read(kick_fd)
            except BlockingIOError:
                continue
            answered = False
            while True:
                while (chain := ring.pop()) is not None:
                    with backend.lock:
                        hook = backend.raw_hook
                        if hook is None or not hook(index, ring, chain):
                            emu.serve(chain)
                    answered = True
                # EVENT_IDX: ask for a kick at the next request, then look once more
                ring.set_avail_event(ring.last_avail)
                if not ring.pending():
                    break
            if answered:
                os.eventfd_write(call_fd, 1)
    except BaseException as e:  # noqa: BLE001 - surfaced by the tests through backend.errors
        backend.errors.append(e)
    finally:
        os.close(call_fd)
        os.close(kick_fd)


class _Kicker:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def kick(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:
            pass  # the session closed the fd: the device resubmits after recovery


# --- virtio-blk config space (virtio 1.x 5.2.4), packed field by field -----------------------

_CONFIG_FIELDS = {  # name: (offset, struct format)
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
    """60 bytes of virtio_blk_config with the given fields set (others 0)."""
    buf = bytearray(CONFIG_LEN)
    for name, value in fields.items():
        off, fmt = _CONFIG_FIELDS[name]
        struct.pack_into(fmt, buf, off, value)
    return bytes(buf)


def qsd_like_config(capacity_bytes: int = 64 << 20, num_queues: int = 1) -> bytes:
    """The config qemu-storage-daemon 7.2 reports (see docs/vhost-user-blk-facts.md)."""
    return blk_config(capacity=capacity_bytes // 512, size_max=0, seg_max=126, blk_size=512,
                      min_io_size=1, opt_io_size=1, num_queues=num_queues,
                      max_discard_sectors=32768, max_discard_seg=1, discard_sector_alignment=1,
                      max_write_zeroes_sectors=32768, max_write_zeroes_seg=1)


#: Features qemu-storage-daemon 7.2 offers (writable export).
QSD_FEATURES = 0x175007e46
