"""The multi-queue virtio-blk block device: one vhost-user session, N virtqueues from one
contiguous shared allocation, a bounce pool, thread-safe I/O, reconnect.

States:  CONNECTED --session lost--> RECOVERING --reconnected--> CONNECTED
                                          \\--timeout / device changed--> FAILED
         any --close()--> CLOSED
"""
from __future__ import annotations

import enum
import errno
import itertools
import logging
import os
import select
import threading
import time
from dataclasses import dataclass

from .errors import ConfigError, RequestError, VblkError
from .layout import VirtqueueLayout
from .memory import PAGE_SIZE, BouncePool, SharedRegion
from .queues import BlockRequest, QueueRunner
from .vhost_user import HandshakeResult, MemoryRegion, VhostUserSession
from .virtio_blk import (CONFIG_SIZE, DRIVER_FEATURES, SECTOR_SIZE, VIRTIO_BLK_F_DISCARD,
                         VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
                         VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD,
                         VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
                         VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
                         VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VIRTIO_RING_F_EVENT_IDX,
                         BlockConfig, VirtioBlkReqSlot)
from .virtqueue import Virtqueue

log = logging.getLogger("vblk")

DEFAULT_MAX_QUEUES = 4
MAX_ATTEMPTS = 3          # a request is resubmitted after a session loss at most this often


class DeviceState(enum.Enum):
    CONNECTED = "connected"
    RECOVERING = "recovering"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True)
class DeviceIdentity:
    """What must not change across a reconnect."""
    capacity: int
    block_size: int
    read_only: bool


def _device_facts(result: HandshakeResult) -> tuple[BlockConfig, DeviceIdentity, int]:
    """The validated config, the identity that must survive a reconnect, and how many
    queues the device offers.  Raises DeviceError for a config that makes no sense."""
    config = BlockConfig.parse(result.config, result.features)
    identity = DeviceIdentity(config.capacity, config.block_size,
                              bool(result.features >> VIRTIO_BLK_F_RO & 1))
    queues = (min(result.num_queues, config.num_queues)
              if result.features >> VIRTIO_BLK_F_MQ & 1 else 1)
    return config, identity, queues


class BlockDevice:
    """A virtio-blk device behind a vhost-user socket, safe to call from many threads.

    Raises ConnectError/TransportError if the back-end cannot be reached or set up,
    ConfigError for parameters the device cannot satisfy (e.g. "Too many queues requested"),
    DeviceError for a config that makes no sense.  I/O methods raise RequestError (with
    ``errno``) or another VblkError.
    """

    def __init__(self, socket_path: str, *, num_queues: int | None = None,
                 queue_size: int = 256, bounce_buffer_size: int = 1 << 20,
                 bounce_buffers: int = 64, control_timeout: float = 5.0,
                 request_timeout: float = 30.0, reconnect_timeout: float = 0.0) -> None:
        self.socket_path = socket_path
        self.control_timeout = control_timeout
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self._state = DeviceState.RECOVERING
        self._state_cond = threading.Condition(threading.Lock())
        self._generation = 0
        self._seq = itertools.count()
        self._rr = itertools.count()
        self._affinity: dict[int, QueueRunner] = {}
        self.failure: str | None = None
        self.reconnects = 0
        self._region: SharedRegion | None = None
        self._monitor: threading.Thread | None = None
        self._monitor_stop = -1
        self._session: VhostUserSession | None = None
        self._recovery_thread: threading.Thread | None = None

        try:
            VirtqueueLayout.new(1, queue_size, VirtioBlkReqSlot)  # validates queue_size
        except ValueError:
            raise ConfigError(f"queue size {queue_size} is invalid: use a power of two from 4 "
                              "to 32768 (default 256)") from None
        if queue_size < 4:
            # A data request needs 3 descriptors (header, data, status): it would never fit.
            raise ConfigError(f"queue size {queue_size} is too small: use a power of two from "
                              "4 to 32768 (default 256)")
        if bounce_buffer_size < 4096 or bounce_buffer_size % 4096:
            raise ConfigError("bounce buffer size must be a multiple of 4096")
        session = VhostUserSession(socket_path, control_timeout)
        try:
            self._setup_from_handshake(session, num_queues, queue_size, bounce_buffers,
                                       bounce_buffer_size)
            self._activate(session)
        except BaseException:
            session.close()
            self._release_memory()
            raise
        self._state = DeviceState.CONNECTED

    # --- set-up ----------------------------------------------------------------------------

    def _setup_from_handshake(self, session: VhostUserSession, num_queues: int | None,
                              queue_size: int, bounce_buffers: int, bounce_buffer_size: int) -> None:
        result = session.handshake(DRIVER_FEATURES, CONFIG_SIZE)
        self.features = result.features
        self.config, self.identity, device_queues = _device_facts(result)
        self.device_queues = device_queues
        if num_queues is None:
            num_queues = min(device_queues, DEFAULT_MAX_QUEUES)
        if not isinstance(num_queues, int) or num_queues < 1:
            raise ConfigError(f"num-queues must be at least 1, not {num_queues}")
        if num_queues > device_queues:
            raise ConfigError(f"Too many queues requested: {num_queues}, but the device at "
                              f"{self.socket_path} offers {device_queues}. Use num-queues="
                              f"{device_queues} or less, or start the back-end with more "
                              "(qemu-storage-daemon: num-queues= in --export)")
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.read_only = self.identity.read_only
        self.layout = VirtqueueLayout.new(num_queues, queue_size, VirtioBlkReqSlot)

        # One contiguous allocation: all queues, then the bounce pool, one memfd.
        queues_bytes = -(-self.layout.total_size // PAGE_SIZE) * PAGE_SIZE
        self._region = SharedRegion(queues_bytes + bounce_buffers * bounce_buffer_size)
        self.bounce_pool = BouncePool(self._region, queues_bytes, bounce_buffers,
                                      bounce_buffer_size)
        size_max = self.config.size_max
        max_transfer = bounce_buffer_size
        if size_max:
            segs = min(self.config.seg_max, queue_size - 3)
            max_transfer = min(max_transfer, size_max * segs // 4096 * 4096)
        self.max_transfer = max_transfer
        event_idx = bool(self.features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self._queues = []
        for i in range(num_queues):
            vq = Virtqueue(self._region.view, i * self.layout.end_offset, self.layout,
                           self._region.base_addr, 8, event_idx)
            self._queues.append(QueueRunner(i, vq, size_max, self._queue_broken))

    def _activate(self, session: VhostUserSession) -> None:
        """Register memory and rings with ``session``, start threads, become CONNECTED."""
        region = self._region
        session.set_mem_table([MemoryRegion(region.base_addr, region.size, region.base_addr,
                                            0, region.fd)])
        generation = self._generation + 1
        try:
            for q in self._queues:
                call_fd, kick_fd = q.attach(generation)
                vq = q.vq
                session.setup_vring(q.index, self.queue_size, vq.desc_addr, vq.used_addr,
                                    vq.avail_addr, call_fd, kick_fd)
        except BaseException:
            for q in self._queues:
                q.detach()
            raise
        session.mark_ready()
        self._session = session
        with self._state_cond:
            self._generation = generation
            for q in self._queues:
                q.start()
            self._monitor_stop = os.eventfd(0, os.EFD_CLOEXEC)
            self._monitor = threading.Thread(target=self._monitor_loop,
                                             args=(session, generation, self._monitor_stop),
                                             name="vblk-monitor", daemon=True)
            self._monitor.start()

    # --- properties ------------------------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def optimal_io_size(self) -> int:
        return max(self.config.opt_io_size, self.config.block_size)

    @property
    def can_flush(self) -> bool:
        return bool(self.features >> VIRTIO_BLK_F_FLUSH & 1)

    def _offers_ranged(self, feature: int, max_sectors: int) -> bool:
        # A limit below one block could not carry a single aligned request: treat as absent.
        return (bool(self.features >> feature & 1) and not self.read_only
                and max_sectors * SECTOR_SIZE >= self.config.block_size)

    @property
    def can_discard(self) -> bool:
        return self._offers_ranged(VIRTIO_BLK_F_DISCARD, self.config.max_discard_sectors)

    @property
    def can_write_zeroes(self) -> bool:
        """True if the device zeroes natively (so a "fast zero" is honest)."""
        return self._offers_ranged(VIRTIO_BLK_F_WRITE_ZEROES,
                                   self.config.max_write_zeroes_sectors)

    def stats(self) -> dict:
        """Per-queue counters and totals (a snapshot; counters are monotonic)."""
        queues = [q.stats.as_dict(q.index) for q in self._queues]
        totals = {k: sum(q[k] for q in queues)
                  for k in ("requests", "bytes", "errors", "kicks", "calls", "in_flight")}
        totals["max_depth"] = max((q["max_depth"] for q in queues), default=0)
        return {"queues": queues, "totals": totals, "state": self._state.value,
                "reconnects": self.reconnects, "failure": self.failure,
                "bounce_buffers_in_use": self.bounce_pool.in_use,
                "bounce_buffers_high_water": self.bounce_pool.high_water}

    # --- dispatch --------------------------------------------------------------------------

    def _pick_queue(self) -> QueueRunner:
        # Thread affinity: each caller thread keeps to one queue, spread round-robin.  Keyed
        # by OS thread id: nbdkit gives every callback a fresh Python thread state, so
        # threading.local() would forget the choice at every request.
        ident = threading.get_ident()
        q = self._affinity.get(ident)
        if q is None:
            q = self._queues[next(self._rr) % len(self._queues)]
            self._affinity[ident] = q
        return q

    def _submit(self, req: BlockRequest) -> None:
        """Publish ``req`` on a queue (waiting for room or for a reconnect).  Raises
        RequestError(EIO) if the device has failed or is closed."""
        q = self._pick_queue()
        req.seq = next(self._seq)
        stalled = None  # (completions seen, since when) while the ring is full
        while True:
            state = self._state
            if state is DeviceState.CONNECTED:
                generation = self._generation
                with q.lock:
                    published = q.try_publish(req, generation)
                    if published:
                        q.kick_if_needed()
                        return
                if published is False:
                    # Ring full: reap what is done (a waiter may not be reaping right now).
                    broken = q.reap()
                    now = time.monotonic()
                    if stalled is None or stalled[0] != q.stats.requests:
                        stalled = (q.stats.requests, now)
                    if broken:
                        self._queue_broken(broken, generation)
                    elif now - stalled[1] >= self.request_timeout:
                        # Nothing completed for request_timeout: the device sits on the ring,
                        # and the requests in it may be our own (nobody else would notice).
                        self._session_lost(f"queue {q.index} stayed full with no completion "
                                           f"for {self.request_timeout:g}s", generation)
                        stalled = None
                    else:
                        with q.lock:
                            if q.vq.num_free < req.descriptor_count(q.size_max):
                                q.space.wait(0.002)
                    continue
            elif state is DeviceState.RECOVERING:
                with self._state_cond:
                    self._state_cond.wait_for(
                        lambda: self._state is not DeviceState.RECOVERING, self.request_timeout)
                continue
            raise RequestError(self._unavailable_reason(), errno.EIO)

    def _unavailable_reason(self) -> str:
        if self._state is DeviceState.CLOSED:
            return "the device is closed"
        return f"the device has failed: {self.failure}"

    def _wait(self, req: BlockRequest) -> None:
        """Wait for ``req`` (without the GIL).  A request the device sits on for longer than
        request_timeout makes the session count as lost; recovery resubmits or fails it."""
        while not req.finished:
            q = req.queue
            if q is not None and q.wait(req, self.request_timeout):
                break
            if q is None:
                req.done.acquire(timeout=self.request_timeout)
            elif not req.finished:
                self._session_lost(
                    f"a request did not complete within {self.request_timeout:g}s",
                    req.generation)
        req.check()

    def _run(self, req: BlockRequest) -> None:
        self._submit(req)
        self._wait(req)

    # --- session loss and recovery ---------------------------------------------------------

    def _queue_broken(self, reason: str, generation: int) -> None:
        self._session_lost(f"device broke the virtqueue protocol ({reason})", generation)

    def _monitor_loop(self, session: VhostUserSession, generation: int, stop_fd: int) -> None:
        poller = select.poll()
        poller.register(session.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(stop_fd, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == stop_fd for fd, _ in events):
                return
            reason = session.peer_gone()
            if reason:
                self._session_lost(reason, generation)
                return

    def _session_lost(self, reason: str, generation: int) -> None:
        with self._state_cond:
            if self._state is not DeviceState.CONNECTED or generation != self._generation:
                return
            self._state = DeviceState.RECOVERING
        log.warning("vblk: session to %s lost: %s", self.socket_path, reason)
        self._recovery_thread = threading.Thread(target=self._recover, args=(reason,),
                                                 name="vblk-recover", daemon=True)
        self._recovery_thread.start()

    def _stop_session(self) -> list[BlockRequest]:
        if self._session is not None:
            self._session.close()
        if self._monitor_stop >= 0:
            os.eventfd_write(self._monitor_stop, 1)
            if self._monitor is not None and self._monitor is not threading.current_thread():
                self._monitor.join()
            os.close(self._monitor_stop)
            self._monitor_stop = -1
        survivors: list[BlockRequest] = []
        for q in self._queues:
            survivors.extend(q.detach())
        survivors.sort(key=lambda r: r.seq)
        return survivors

    def _recover(self, reason: str) -> None:
        survivors = self._stop_session()
        failure = reason
        if self.reconnect_timeout > 0:
            deadline = time.monotonic() + self.reconnect_timeout
            delay = 0.05
            while self._state is DeviceState.RECOVERING:
                try:
                    self._reconnect()
                except Exception as e:  # noqa: BLE001 - any failure: retry, then give up
                    failure = f"{reason}; reconnecting failed: {e}"
                    if getattr(e, "final", False) or time.monotonic() + delay > deadline:
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self.reconnects += 1
                log.warning("vblk: reconnected to %s, resubmitting %d request(s)",
                            self.socket_path, len(survivors))
                for req in survivors:
                    req.attempts += 1
                    if req.attempts > MAX_ATTEMPTS:
                        req.fail(RequestError(f"request lost {req.attempts} sessions in a row "
                                              f"(last: {reason})", errno.EIO))
                        continue
                    self._resubmit(req)
                with self._state_cond:
                    if self._state is DeviceState.RECOVERING:
                        self._state = DeviceState.CONNECTED
                    self._state_cond.notify_all()
                for req in survivors:
                    req.wake()  # their waiters re-check, and one of them becomes the reaper
                return
        with self._state_cond:
            if self._state is DeviceState.RECOVERING:
                self._state = DeviceState.FAILED
            self.failure = failure
            self._state_cond.notify_all()
        log.error("vblk: device %s failed: %s", self.socket_path, failure)
        for req in survivors:
            req.fail(RequestError(f"device lost: {failure}", errno.EIO))

    def _reconnect(self) -> None:
        session = VhostUserSession(self.socket_path, self.control_timeout)
        try:
            result = session.handshake(DRIVER_FEATURES, CONFIG_SIZE)
            _config, identity, queues = _device_facts(result)
            changed = None
            if identity != self.identity:
                changed = f"the device changed: was {self.identity}, now {identity}"
            elif result.features != self.features:
                changed = (f"the device now negotiates features {result.features:#x} instead "
                           f"of {self.features:#x}")
            elif queues < self.num_queues:
                changed = f"the device now offers {queues} queues, we use {self.num_queues}"
            if changed:
                err = VblkError(changed)
                err.final = True
                raise err
            self._activate(session)
        except BaseException:
            session.close()
            raise

    def _resubmit(self, req: BlockRequest) -> None:
        q = req.queue or self._queues[0]
        with q.lock:
            if not q.try_publish(req, self._generation):
                req.fail(RequestError("could not resubmit a request after reconnecting",
                                      errno.EIO))
                return
            q.kick_if_needed()

    # --- checks ----------------------------------------------------------------------------

    def _check_range(self, offset: int, length: int, what: str, write: bool) -> None:
        if write and self.read_only:
            raise RequestError(f"{what}: the device is read-only", errno.EROFS)
        bs = self.config.block_size
        if offset < 0 or length < 0:
            raise RequestError(f"{what}: negative offset or length", errno.EINVAL)
        if offset % bs or length % bs:
            raise RequestError(f"{what}: offset {offset} and length {length} must be multiples "
                               f"of the device block size {bs}", errno.EINVAL)
        if offset + length > self.config.capacity:
            raise RequestError(f"{what}: {length} bytes at {offset} go past the end of the "
                               f"device ({self.config.capacity} bytes)", errno.EIO)

    # --- data transfer ---------------------------------------------------------------------

    def _transfer(self, mv: memoryview, offset: int, is_read: bool) -> None:
        """Move ``mv`` to/from the device in bounce-buffer-sized requests, several in flight.
        Waits for every request it started, even after an error, before raising the first."""
        region = self._region
        if region is None:  # closed (or failed before set-up)
            raise RequestError(self._unavailable_reason(), errno.EIO)
        pool, region_view = self.bounce_pool, region.view
        step = self.max_transfer
        total = len(mv)
        if total <= step:
            # Fast path: one request, one bounce buffer.
            index = pool.acquire(self.request_timeout)  # tries the lock-free path first
            try:
                boff = pool.offset_of(index)
                if not is_read:
                    region_view[boff:boff + total] = mv
                req = BlockRequest(VIRTIO_BLK_T_IN if is_read else VIRTIO_BLK_T_OUT,
                                   offset // SECTOR_SIZE, pool.addr_of(index), total, is_read)
                self._submit(req)
                self._wait(req)
                if is_read:
                    mv[:] = region_view[boff:boff + total]
            finally:
                pool.release(index)
            return
        pending: list[tuple[BlockRequest, int, int, int]] = []
        first_error: BaseException | None = None

        def finish(entry: tuple[BlockRequest, int, int, int]) -> None:
            nonlocal first_error
            req, index, pos, boff = entry
            try:
                self._wait(req)
                if is_read and first_error is None:
                    mv[pos:pos + req.data_len] = region_view[boff:boff + req.data_len]
            except BaseException as e:
                if first_error is None:
                    first_error = e
            finally:
                pool.release(index)

        try:
            for pos in range(0, total, step):
                if first_error is not None:
                    break
                length = min(step, total - pos)
                index = pool.try_acquire()
                while index is None and pending:
                    finish(pending.pop(0))
                    index = pool.try_acquire()
                if index is None:
                    index = pool.acquire(self.request_timeout)
                boff = pool.offset_of(index)
                if not is_read:
                    region_view[boff:boff + length] = mv[pos:pos + length]
                req = BlockRequest(VIRTIO_BLK_T_IN if is_read else VIRTIO_BLK_T_OUT,
                                   (offset + pos) // SECTOR_SIZE, pool.addr_of(index), length,
                                   is_read)
                try:
                    self._submit(req)
                except BaseException:
                    pool.release(index)
                    raise
                pending.append((req, index, pos, boff))
        except BaseException as e:
            if first_error is None:
                first_error = e
        for entry in pending:
            finish(entry)
        if first_error is not None:
            raise first_error

    def _transfer_checked(self, mv: memoryview, offset: int, is_read: bool) -> None:
        try:
            self._transfer(mv, offset, is_read)
        except ValueError:
            if self._region is None:  # closed under our feet: the memory view is gone
                raise RequestError("the device was closed", errno.EIO) from None
            raise

    def pread(self, buf, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into the writable buffer ``buf``.

        Offset and length must be multiples of block_size (EINVAL), within capacity (EIO).
        """
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv), "read", False)
        if len(mv):
            self._transfer_checked(mv, offset, True)

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``; with ``fua`` it is on stable storage on return.

        EROFS on a read-only device; alignment and range as for pread.
        """
        mv = memoryview(buf).cast("B")
        self._check_range(offset, len(mv), "write", True)
        if len(mv):
            self._transfer_checked(mv, offset, False)
        if fua:
            self.flush()

    def flush(self) -> None:
        """Make completed writes stable (a no-op if the device has no FLUSH: write-through)."""
        if self.can_flush:
            self._run(BlockRequest(VIRTIO_BLK_T_FLUSH, 0))

    def _ranged(self, req_type: int, offset: int, length: int, max_sectors: int,
                flags: int) -> None:
        step = max_sectors * SECTOR_SIZE // self.config.block_size * self.config.block_size
        reqs = []
        error: BaseException | None = None
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            req = BlockRequest(req_type, 0, segment=(pos // SECTOR_SIZE, n // SECTOR_SIZE, flags))
            try:
                self._submit(req)
            except BaseException as e:
                error = e
                break
            reqs.append(req)
        for req in reqs:
            try:
                self._wait(req)
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def discard(self, offset: int, length: int) -> None:
        """Tell the device the range is unused (EOPNOTSUPP without DISCARD, EROFS if read-only)."""
        self._check_range(offset, length, "discard", True)
        if not self.can_discard:
            raise RequestError("the device does not support discard", errno.EOPNOTSUPP)
        if length:
            self._ranged(VIRTIO_BLK_T_DISCARD, offset, length,
                         self.config.max_discard_sectors, 0)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False,
                     fast: bool = False) -> None:
        """Zero the range; ``unmap`` lets the device deallocate it.  Without WRITE_ZEROES the
        zeroes are written as data, unless ``fast`` is set (then EOPNOTSUPP)."""
        self._check_range(offset, length, "write-zeroes", True)
        if not length:
            return
        if self.can_write_zeroes:
            flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
            self._ranged(VIRTIO_BLK_T_WRITE_ZEROES, offset, length,
                         self.config.max_write_zeroes_sectors, flags)
            return
        if fast:
            raise RequestError("the device cannot zero quickly (no WRITE_ZEROES)",
                               errno.EOPNOTSUPP)
        zeroes = bytes(min(length, self.max_transfer))
        for pos in range(offset, offset + length, len(zeroes)):
            n = min(len(zeroes), offset + length - pos)
            self._transfer(memoryview(zeroes)[:n], pos, False)

    def get_id(self) -> bytes:
        """The device's serial (GET_ID), up to 20 bytes, cut at the first NUL."""
        if self._region is None:
            raise RequestError(self._unavailable_reason(), errno.EIO)
        index = self.bounce_pool.acquire(self.request_timeout)
        boff = self.bounce_pool.offset_of(index)
        try:
            self._region.view[boff:boff + VIRTIO_BLK_ID_BYTES] = bytes(VIRTIO_BLK_ID_BYTES)
            req = BlockRequest(VIRTIO_BLK_T_GET_ID, 0, self.bounce_pool.addr_of(index),
                               VIRTIO_BLK_ID_BYTES, True)
            self._run(req)
            written = min(max(req.written - 1, 0), VIRTIO_BLK_ID_BYTES)
            data = bytes(self._region.view[boff:boff + written])
        finally:
            self.bounce_pool.release(index)
        return data.split(b"\0", 1)[0]

    # --- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop threads, fail anything still in flight with EIO, free memory.  Idempotent."""
        with self._state_cond:
            if self._state is DeviceState.CLOSED:
                return
            self._state = DeviceState.CLOSED
            self._state_cond.notify_all()
        recovery = self._recovery_thread
        if recovery is not None and recovery is not threading.current_thread():
            recovery.join()
        for req in self._stop_session():
            req.fail(RequestError("the device was closed", errno.EIO))
        self._release_memory()

    def _release_memory(self) -> None:
        if self._region is not None:
            for q in getattr(self, "_queues", ()):
                q.vq.release()  # a live view on the mapping would make close() leak it
            self._region.close()
            self._region = None

    def __enter__(self) -> "BlockDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
