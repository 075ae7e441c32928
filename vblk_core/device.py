"""The multi-queue virtio-blk block device: N virtqueues and a bounce pool in one contiguous
shared allocation, over any Transport, safe to call from many threads.

This module sets the device up and implements the I/O verbs; dispatch.py puts requests on
queues (back-pressure, stall detection), supervisor.py owns the session state machine (loss,
recovery, reconnect), queues.py the per-queue machinery, batch.py requests split in pieces.

    dev = BlockDevice.open(VhostUserConnector("/run/vhost.sock"), num_queues=4)
    dev.pread(buf, 0); dev.pwrite(data, 4096, fua=True); dev.close()
"""
from __future__ import annotations

import errno
from typing import Any

from .batch import Batch, bounced_transfer
from .device_info import DeviceInfo, identify
from .dispatch import Dispatcher
from .errors import ConfigError, DeviceChanged, DeviceError, RequestError
from .layout import VirtqueueLayout
from .memory import PAGE_SIZE, BouncePool, SharedRegion
from .queues import QueueRunner
from .request import BlockRequest
from .supervisor import DeviceState, Supervisor
from .transport import Connector, MemoryMap, Transport
from .virtio import VirtioFeature
from .virtio_blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    BlockConfig,
    RequestType,
    VirtioBlkReqSlot,
    queue_size_problem,
)
from .virtqueue import Virtqueue

DEFAULT_MAX_QUEUES = 4


class BlockDevice:
    """A virtio-blk device reached through ``connector``'s transports.

    Construction checks the parameters (ConfigError) and connects nothing; ``connect()`` (or
    the ``open`` shorthand) makes the first session.  I/O methods raise RequestError (with
    ``errno``) or another VblkError.
    """

    def __init__(self, connector: Connector, *, num_queues: int | None = None,
                 queue_size: int = 256, bounce_buffer_size: int = 1 << 20,
                 bounce_buffers: int = 64, request_timeout: float = 30.0,
                 reconnect_timeout: float = 0.0, spin_seconds: float = 0.0) -> None:
        problem = queue_size_problem(queue_size)
        if problem:
            raise ConfigError(f"queue size {queue_size} is invalid: {problem}")
        if num_queues is not None and (not isinstance(num_queues, int) or num_queues < 1):
            raise ConfigError(f"num-queues must be at least 1, not {num_queues}")
        if bounce_buffer_size < 4096 or bounce_buffer_size % 4096:
            raise ConfigError("bounce buffer size must be a multiple of 4096")
        if bounce_buffers < 1:
            raise ConfigError("at least one bounce buffer is needed")
        self.connector = connector
        self.target = connector.target
        self.requested_queues = num_queues
        self.queue_size = queue_size
        self.bounce_buffer_size = bounce_buffer_size
        self.bounce_buffers = bounce_buffers
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self.spin_seconds = spin_seconds
        # What the device is: filled in by connect().
        self.info: DeviceInfo | None = None
        self.features = 0
        self.capacity = 0
        self.block_size = SECTOR_SIZE
        self.read_only = True
        self.device_queues = 0
        self.num_queues = 0
        self.max_transfer = 0
        self.layout: VirtqueueLayout | None = None
        # Memory and queues: allocated by connect(), freed by close().
        self._region: SharedRegion | None = None
        self._device_base: int | None = None
        self._pool: BouncePool | None = None
        self._rings: list[Virtqueue] = []
        self._queues: list[QueueRunner] = []
        self._supervisor = Supervisor(connector, self, reconnect_timeout)
        self._dispatch = Dispatcher(self._supervisor, request_timeout)
        self._run = self._dispatch.run

    @classmethod
    def open(cls, connector: Connector, **options: Any) -> BlockDevice:
        """Construct and connect.  Raises ConfigError for bad options or a device that cannot
        satisfy them, ConnectError/TransportError, DeviceError for a nonsensical config."""
        device = cls(connector, **options)
        device.connect()
        return device

    # --- set-up ----------------------------------------------------------------------------

    def connect(self) -> None:
        """The first session: identify the device, allocate, set up every queue.  Raises as
        ``open`` does; on failure nothing is left allocated."""
        if self.state is not DeviceState.NEW:
            raise RequestError(f"connect(): the device is {self.state.value}", errno.EINVAL)
        transport = self.connector.connect()
        try:
            info = identify(transport)
            self._allocate(info)
            self._supervisor.begin(transport)
        except BaseException:
            transport.close()
            self._release_memory()
            raise

    def _allocate(self, info: DeviceInfo) -> None:
        config = info.config
        num_queues = self.requested_queues or min(info.max_queues, DEFAULT_MAX_QUEUES)
        if num_queues > info.max_queues:
            raise ConfigError(f"Too many queues requested: {num_queues}, but the device at "
                              f"{self.target} offers {info.max_queues}. Use num-queues="
                              f"{info.max_queues} or less, or give the device more queues "
                              "(qemu-storage-daemon: num-queues= in --export)")
        if self.queue_size > info.max_queue_size:
            raise ConfigError(f"queue size {self.queue_size} is too big: the device at "
                              f"{self.target} accepts up to {info.max_queue_size} entries")
        self.info = info
        self.features = info.features
        self.capacity = config.capacity
        self.block_size = config.block_size
        self.read_only = info.read_only
        self.device_queues = info.max_queues
        self.num_queues = num_queues
        self.layout = layout = VirtqueueLayout.new(num_queues, self.queue_size, VirtioBlkReqSlot)
        # One contiguous allocation: all queues, then the bounce pool, one memfd.
        queues_bytes = -(-layout.total_size // PAGE_SIZE) * PAGE_SIZE
        self._region = region = SharedRegion(
            queues_bytes + self.bounce_buffers * self.bounce_buffer_size)
        self._pool = BouncePool(region, queues_bytes, self.bounce_buffers,
                                self.bounce_buffer_size)
        max_transfer = self.bounce_buffer_size
        if config.size_max:
            segs = min(config.seg_max, self.queue_size - 3)
            max_transfer = min(max_transfer, config.size_max * segs // 4096 * 4096)
        self.max_transfer = max_transfer
        event_idx = bool(info.features & VirtioFeature.EVENT_IDX)
        self._rings = [Virtqueue(region.view, i * layout.end_offset, layout, region.base_addr,
                                 8, event_idx) for i in range(num_queues)]
        self._queues = [QueueRunner(i, ring, config.size_max, self._dispatch.queue_broken,
                                    self.spin_seconds, self._lone_request)
                        for i, ring in enumerate(self._rings)]
        self._dispatch.queues = self._queues

    # --- the supervisor's side (SessionHost) -----------------------------------------------

    def attach(self, transport: Transport, generation: int) -> None:
        """Map the shared region and set every queue up on ``transport``, then start it."""
        region = self._region
        if region is None or self._pool is None:
            raise RequestError(self._supervisor.unavailable_reason(), errno.EIO)
        base = transport.map_memory(MemoryMap(region.fd, region.base_addr, region.size))
        if self._device_base is None:
            for ring in self._rings:
                ring.set_device_base(base)
            self._pool.set_device_base(base)
            self._device_base = base
        elif base != self._device_base:
            # Requests in flight carry device addresses of the old mapping.
            raise DeviceError(f"{self.target} mapped the memory at {base:#x}, not at "
                              f"{self._device_base:#x} as before")
        try:
            for q in self._queues:
                q.attach(transport, generation)
            transport.start()
        except BaseException:
            for q in self._queues:
                q.detach()
            raise
        for q in self._queues:
            q.start()

    def _lone_request(self) -> bool:
        """Exactly one request in flight on the whole device (a spin may then pay off)."""
        return sum(q.stats.depth for q in self._queues) == 1

    def detach(self) -> list[BlockRequest]:
        survivors: list[BlockRequest] = []
        for q in self._queues:
            survivors.extend(q.detach())
        return survivors

    def check_same_device(self, info: DeviceInfo) -> None:
        assert self.info is not None
        if info.identity != self.info.identity:
            raise DeviceChanged("its identity", self.info.identity, info.identity)
        if info.features != self.features:
            raise DeviceChanged("the negotiated features", hex(self.features),
                                hex(info.features))
        if info.max_queues < self.num_queues:
            raise DeviceChanged("the number of queues it offers", self.num_queues,
                                info.max_queues)

    def resubmit(self, req: BlockRequest) -> None:
        self._dispatch.resubmit(req)

    # --- properties ------------------------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        return self._supervisor.state

    @property
    def failure(self) -> str | None:
        return self._supervisor.failure

    @property
    def reconnects(self) -> int:
        return self._supervisor.reconnects

    @property
    def config(self) -> BlockConfig:
        if self.info is None:
            raise RequestError("the device is not connected", errno.EIO)
        return self.info.config

    @property
    def optimal_io_size(self) -> int:
        return max(self.config.opt_io_size, self.block_size)

    @property
    def can_flush(self) -> bool:
        return bool(self.features & BlkFeature.FLUSH)

    def _offers_ranged(self, feature: BlkFeature, max_sectors: int) -> bool:
        # A limit below one block could not carry a single aligned request: treat as absent.
        return (bool(self.features & feature) and not self.read_only
                and max_sectors * SECTOR_SIZE >= self.block_size)

    @property
    def can_discard(self) -> bool:
        return self._offers_ranged(BlkFeature.DISCARD, self.config.max_discard_sectors)

    @property
    def can_write_zeroes(self) -> bool:
        """True if the device zeroes natively (so a "fast zero" is honest)."""
        return self._offers_ranged(BlkFeature.WRITE_ZEROES,
                                   self.config.max_write_zeroes_sectors)

    def stats(self) -> dict[str, Any]:
        """Per-queue counters and totals (a snapshot; counters are monotonic)."""
        queues = [q.stats.as_dict(q.index) for q in self._queues]
        totals = {k: sum(q[k] for q in queues)
                  for k in ("requests", "bytes", "errors", "kicks", "calls", "in_flight")}
        totals["max_depth"] = max((q["max_depth"] for q in queues), default=0)
        pool = self._pool
        return {"queues": queues, "totals": totals, "state": self.state.value,
                "reconnects": self.reconnects, "failure": self.failure,
                "bounce_buffers_in_use": pool.in_use if pool else 0,
                "bounce_buffers_high_water": pool.high_water if pool else 0}

    # --- checks ----------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int, what: str, write: bool) -> None:
        if self._region is None:
            raise RequestError(self._supervisor.unavailable_reason(), errno.EIO)
        if write and self.read_only:
            raise RequestError(f"{what}: the device is read-only", errno.EROFS)
        bs = self.block_size
        if offset < 0 or length < 0:
            raise RequestError(f"{what}: negative offset or length", errno.EINVAL)
        if offset % bs or length % bs:
            raise RequestError(f"{what}: offset {offset} and length {length} must be multiples "
                               f"of the device block size {bs}", errno.EINVAL)
        if offset + length > self.capacity:
            raise RequestError(f"{what}: {length} bytes at {offset} go past the end of the "
                               f"device ({self.capacity} bytes)", errno.EIO)

    # --- data transfer ---------------------------------------------------------------------

    def _transfer(self, mv: memoryview, offset: int, is_read: bool) -> None:
        """Move ``mv`` to/from the device in bounce-buffer-sized requests, several in flight."""
        region, pool = self._region, self._pool
        if region is None or pool is None:  # closed (or never connected)
            raise RequestError(self._supervisor.unavailable_reason(), errno.EIO)
        dispatch = self._dispatch
        try:
            bounced_transfer(mv, offset, is_read, region.view, pool, self.max_transfer,
                             self.request_timeout, dispatch.run, dispatch.submit, dispatch.wait)
        except ValueError:
            if self._region is None:  # closed under our feet: the memory view is gone
                raise RequestError("the device was closed", errno.EIO) from None
            raise

    def pread(self, buf: Any, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into the writable buffer ``buf``.

        Offset and length must be multiples of block_size (EINVAL), within capacity (EIO).
        """
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv), "read", False)
        if len(mv):
            self._transfer(mv, offset, True)

    def pwrite(self, buf: Any, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``; with ``fua`` it is on stable storage on return.

        EROFS on a read-only device; alignment and range as for pread.
        """
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv), "write", True)
        if len(mv):
            self._transfer(mv, offset, False)
        if fua:
            self.flush()

    def flush(self) -> None:
        """Make completed writes stable (a no-op if the device has no FLUSH: write-through)."""
        if self.can_flush:
            self._run(BlockRequest(RequestType.FLUSH, 0))

    def _ranged(self, req_type: RequestType, offset: int, length: int, max_sectors: int,
                flags: int) -> None:
        step = max_sectors * SECTOR_SIZE // self.block_size * self.block_size
        batch = Batch(self._dispatch.submit, self._dispatch.wait)
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            req = BlockRequest(req_type, 0, segment=(pos // SECTOR_SIZE, n // SECTOR_SIZE, flags))
            if not batch.submit(req):
                break
        batch.finish()

    def discard(self, offset: int, length: int) -> None:
        """Tell the device the range is unused (EOPNOTSUPP without DISCARD, EROFS if read-only)."""
        self._check_range(offset, length, "discard", True)
        if not self.can_discard:
            raise RequestError("the device does not support discard", errno.EOPNOTSUPP)
        if length:
            self._ranged(RequestType.DISCARD, offset, length, self.config.max_discard_sectors, 0)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     fast: bool = False) -> None:
        """Zero the range; ``unmap`` lets the device deallocate it.  Without WRITE_ZEROES the
        zeroes are written as data, unless ``fast`` is set (then EOPNOTSUPP)."""
        self._check_range(offset, length, "write-zeroes", True)
        if not length:
            return
        if self.can_write_zeroes:
            flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
            self._ranged(RequestType.WRITE_ZEROES, offset, length,
                         self.config.max_write_zeroes_sectors, flags)
            return
        if fast:
            raise RequestError("the device cannot zero quickly (no WRITE_ZEROES)",
                               errno.EOPNOTSUPP)
        zeroes = memoryview(bytes(min(length, self.max_transfer)))
        for pos in range(offset, offset + length, len(zeroes)):
            self._transfer(zeroes[:min(len(zeroes), offset + length - pos)], pos, False)

    def get_id(self) -> bytes:
        """The device's serial (GET_ID), up to 20 bytes, cut at the first NUL."""
        region, pool = self._region, self._pool
        if region is None or pool is None:
            raise RequestError(self._supervisor.unavailable_reason(), errno.EIO)
        index = pool.acquire(self.request_timeout)
        boff = pool.offset_of(index)
        try:
            region.view[boff:boff + VIRTIO_BLK_ID_BYTES] = bytes(VIRTIO_BLK_ID_BYTES)
            req = BlockRequest(RequestType.GET_ID, 0, pool.addr_of(index),
                               VIRTIO_BLK_ID_BYTES, True)
            self._run(req)
            written = min(max(req.written - 1, 0), VIRTIO_BLK_ID_BYTES)
            data = bytes(region.view[boff:boff + written])
        finally:
            pool.release(index)
        return data.split(b"\0", 1)[0]

    # --- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop threads, fail anything still in flight with EIO, free memory.  Idempotent."""
        for req in self._supervisor.close():
            req.fail(RequestError("the device was closed", errno.EIO))
        self._release_memory()

    def _release_memory(self) -> None:
        if self._region is not None:
            for ring in self._rings:
                ring.release()  # a live view on the mapping would make close() leak it
            self._region.close()
            self._region = None

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
