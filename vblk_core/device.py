"""The multi-queue virtio-blk block device: N virtqueues and a bounce pool in one contiguous
shared allocation, over any Transport, safe to call from many threads.

This module checks the parameters and the I/O verbs' arguments and sets the device up;
datapath.py moves the data (slots, queues, pieces), supervisor.py owns the session state
machine (loss, recovery, reconnect), queues.py the per-queue machinery.

    dev = BlockDevice.open(VhostUserConnector("/run/vhost.sock"), num_queues=4)
    dev.pread(buf, 0); dev.pwrite(data, 4096, fua=True); dev.close()
"""
from __future__ import annotations

import errno
from typing import Any

from .datapath import DataPath
from .device_info import DeviceInfo, identify
from .errors import ConfigError, RequestError
from .layout import VirtqueueLayout
from .supervisor import DeviceState, Supervisor
from .transport import Connector
from .virtio import VirtioFeature
from .virtio_blk import (
    SECTOR_SIZE,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    BlkFeature,
    BlockConfig,
    RequestType,
    queue_size_problem,
)

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
        self._path: DataPath | None = None
        self._supervisor = Supervisor(connector, reconnect_timeout)

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
            assert self._path is not None
            self._supervisor.begin(transport, self._path, info, self.num_queues)
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
        # One contiguous allocation: all queues, then every slot's bounce buffer, one memfd.
        self._path = path = DataPath(
            num_queues, self.queue_size, self.bounce_buffers, self.bounce_buffer_size,
            config.size_max, config.seg_max, bool(info.features & VirtioFeature.EVENT_IDX),
            self.request_timeout, self._supervisor, self.spin_seconds)
        self.layout = path.layout
        self.max_transfer = path.max_transfer

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
        path = self._path
        data: dict[str, Any] = path.stats() if path is not None else {
            "queues": [], "bounce_buffers_in_use": 0, "bounce_buffers_high_water": 0}
        queues = data["queues"]
        totals = {k: sum(q[k] for q in queues)
                  for k in ("requests", "bytes", "errors", "kicks", "calls", "in_flight")}
        totals["max_depth"] = max((q["max_depth"] for q in queues), default=0)
        return {"queues": queues, "totals": totals, "state": self.state.value,
                "reconnects": self.reconnects, "failure": self.failure,
                "bounce_buffers_in_use": data["bounce_buffers_in_use"],
                "bounce_buffers_high_water": data["bounce_buffers_high_water"]}

    # --- checks ----------------------------------------------------------------------------

    def _checked(self, offset: int, length: int, what: str, write: bool) -> DataPath:
        """The data path, after checking a request's range.  Raises RequestError: EIO if the
        device is not connected or the range goes past its end, EROFS, EINVAL."""
        path = self._path
        if path is None:
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
        return path

    # --- the verbs -------------------------------------------------------------------------

    def pread(self, buf: Any, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into the writable buffer ``buf``.

        Offset and length must be multiples of block_size (EINVAL), within capacity (EIO).
        """
        mv = memoryview(buf).cast("B")
        path = self._checked(offset, len(mv), "read", False)
        if len(mv):
            path.read(mv, offset)

    def pwrite(self, buf: Any, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``; with ``fua`` it is on stable storage on return.

        EROFS on a read-only device; alignment and range as for pread.
        """
        mv = memoryview(buf).cast("B")
        path = self._checked(offset, len(mv), "write", True)
        if len(mv):
            path.write(mv, offset)
        if fua:
            self.flush()

    def flush(self) -> None:
        """Make completed writes stable (a no-op if the device has no FLUSH: write-through)."""
        if self.can_flush:
            self._checked(0, 0, "flush", False).command(RequestType.FLUSH)

    def _ranged(self, path: DataPath, req_type: RequestType, offset: int, length: int,
                max_sectors: int, flags: int) -> None:
        step = max_sectors * SECTOR_SIZE // self.block_size * self.block_size
        path.ranged(req_type, offset, length, step, flags)

    def discard(self, offset: int, length: int) -> None:
        """Tell the device the range is unused (EOPNOTSUPP without DISCARD, EROFS if read-only)."""
        path = self._checked(offset, length, "discard", True)
        if not self.can_discard:
            raise RequestError("the device does not support discard", errno.EOPNOTSUPP)
        if length:
            self._ranged(path, RequestType.DISCARD, offset, length,
                         self.config.max_discard_sectors, 0)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     fast: bool = False) -> None:
        """Zero the range; ``unmap`` lets the device deallocate it.  Without WRITE_ZEROES the
        zeroes are written as data, unless ``fast`` is set (then EOPNOTSUPP)."""
        path = self._checked(offset, length, "write-zeroes", True)
        if not length:
            return
        if self.can_write_zeroes:
            flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
            self._ranged(path, RequestType.WRITE_ZEROES, offset, length,
                         self.config.max_write_zeroes_sectors, flags)
            return
        if fast:
            raise RequestError("the device cannot zero quickly (no WRITE_ZEROES)",
                               errno.EOPNOTSUPP)
        zeroes = memoryview(bytes(min(length, self.max_transfer)))
        for pos in range(offset, offset + length, len(zeroes)):
            path.write(zeroes[:min(len(zeroes), offset + length - pos)], pos)

    def get_id(self) -> bytes:
        """The device's serial (GET_ID), up to 20 bytes, cut at the first NUL."""
        return self._checked(0, 0, "get-id", False).get_id().split(b"\0", 1)[0]

    # --- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop threads, fail anything still in flight with EIO, free memory.  Idempotent."""
        self._supervisor.close()
        self._release_memory()

    def _release_memory(self) -> None:
        if self._path is not None:
            self._path.close()
            self._path = None

    def __enter__(self) -> BlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
