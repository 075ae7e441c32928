"""Session supervision for the block device: the state machine, loss detection and recovery.

    NEW --first session--> CONNECTED --session lost--> RECOVERING --reconnected--> CONNECTED
                                                           \\--timeout / device changed--> FAILED
    any --close()--> CLOSED

A session is lost when its transport says so (the monitor thread polls ``loss_fd``), when a
queue's device broke the ring protocol, or when a request or a full ring saw no completion
for the request timeout.  Recovery then stops the session, keeps the requests that did not
complete, asks the connector for a fresh transport (within ``reconnect_timeout``), checks it
is the same device, and resubmits them in their original order; or fails them with EIO.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import select
import threading
import time
from typing import Protocol

from .device_info import DeviceInfo, identify
from .errors import DeviceChanged, RequestError
from .slot import RequestSlot
from .transport import Connector, Transport

log = logging.getLogger("vblk")

MAX_ATTEMPTS = 3          # a request is resubmitted after a session loss at most this often


class DeviceState(enum.Enum):
    NEW = "new"
    CONNECTED = "connected"
    RECOVERING = "recovering"
    FAILED = "failed"
    CLOSED = "closed"


class Session(Protocol):
    """What the supervisor drives: the device's queues and memory (datapath.DataPath)."""

    def attach(self, transport: Transport, generation: int) -> None:
        """Map memory and set every queue up on ``transport``, then start it."""

    def detach(self) -> list[RequestSlot]:
        """Stop every queue; return the requests that did not complete, oldest first."""

    def resubmit(self, slots: list[RequestSlot]) -> None:
        """Publish ``slots`` again on the current session (or fail them)."""

    def fail(self, slot: RequestSlot, error: Exception) -> None:
        """Finish ``slot`` with ``error`` and wake its owner."""


def check_same_device(was: DeviceInfo, now: DeviceInfo, num_queues: int) -> None:
    """Raise DeviceChanged unless ``now`` can carry on the requests of ``was`` (same identity
    and features, at least ``num_queues`` queues)."""
    if now.identity != was.identity:
        raise DeviceChanged("its identity", was.identity, now.identity)
    if now.features != was.features:
        raise DeviceChanged("the negotiated features", hex(was.features), hex(now.features))
    if now.max_queues < num_queues:
        raise DeviceChanged("the number of queues it offers", num_queues, now.max_queues)


class Supervisor:
    """Owns the device's state and its current transport.  ``state`` and ``generation`` are
    plain attributes, read without a lock.  ``begin`` makes the first session of ``session``
    (queues of the device ``info`` describes, ``num_queues`` of them)."""

    def __init__(self, connector: Connector, reconnect_timeout: float) -> None:
        self.connector = connector
        self.reconnect_timeout = reconnect_timeout
        self.state = DeviceState.NEW
        self.generation = 0
        self.failure: str | None = None
        self.reconnects = 0
        self._cond = threading.Condition(threading.Lock())
        self._transport: Transport | None = None
        self._session: Session | None = None
        self._info: DeviceInfo | None = None
        self._num_queues = 0
        self._monitor: threading.Thread | None = None
        self._monitor_stop = -1
        self._recovery: threading.Thread | None = None

    # --- sessions --------------------------------------------------------------------------

    def begin(self, transport: Transport, session: Session, info: DeviceInfo,
              num_queues: int) -> None:
        """The first session: ``transport`` (identified as ``info``) carries ``session``'s
        ``num_queues`` queues.  Raises what session.attach raises."""
        self._session, self._info, self._num_queues = session, info, num_queues
        self._begin(transport)

    def _begin(self, transport: Transport) -> None:
        assert self._session is not None
        generation = self.generation + 1
        self._session.attach(transport, generation)
        self._transport = transport
        stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        with self._cond:
            self.generation = generation
            self._monitor_stop = stop_fd
            self._monitor = threading.Thread(target=self._monitor_loop,
                                             args=(transport, generation, stop_fd),
                                             name="vblk-monitor", daemon=True)
            self._monitor.start()
            if self.state is DeviceState.NEW:
                self.state = DeviceState.CONNECTED
            # After a reconnect the state stays RECOVERING until the survivors are resubmitted,
            # so that new requests queue behind them.

    def _monitor_loop(self, transport: Transport, generation: int, stop_fd: int) -> None:
        poller = select.poll()
        loss_fd = transport.loss_fd()
        if loss_fd >= 0:
            poller.register(loss_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(stop_fd, select.POLLIN)
        while True:
            events = poller.poll()
            if any(fd == stop_fd for fd, _ in events):
                return
            reason = transport.loss_reason()
            if reason:
                self.lost(reason, generation)
                return

    def _end_session(self) -> list[RequestSlot]:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._monitor_stop >= 0:
            os.eventfd_write(self._monitor_stop, 1)
            if self._monitor is not None and self._monitor is not threading.current_thread():
                self._monitor.join()
            os.close(self._monitor_stop)
            self._monitor_stop = -1
        return self._session.detach() if self._session is not None else []

    # --- waiting ---------------------------------------------------------------------------

    def await_session(self, timeout: float) -> None:
        """Return once the device is CONNECTED again (or ``timeout`` passed).  Raises
        RequestError(EIO) if it has failed, is closed or was never connected."""
        with self._cond:
            if self.state is DeviceState.RECOVERING:
                self._cond.wait_for(lambda: self.state is not DeviceState.RECOVERING, timeout)
            state = self.state
        if state is DeviceState.CONNECTED:
            time.sleep(0.001)  # a queue between two sessions: let recovery finish
        elif state is not DeviceState.RECOVERING:
            raise RequestError(self.unavailable_reason(), errno.EIO)

    def unavailable_reason(self) -> str:
        if self.state is DeviceState.CLOSED:
            return "the device is closed"
        if self.state is DeviceState.NEW:
            return "the device is not connected"
        return f"the device has failed: {self.failure}"

    # --- loss and recovery -----------------------------------------------------------------

    def lost(self, reason: str, generation: int) -> None:
        """Session ``generation`` is over (a no-op if it already was): recover in a thread."""
        with self._cond:
            if self.state is not DeviceState.CONNECTED or generation != self.generation:
                return
            self.state = DeviceState.RECOVERING
        log.warning("vblk: session to %s lost: %s", self.connector.target, reason)
        self._recovery = threading.Thread(target=self._recover, args=(reason,),
                                          name="vblk-recover", daemon=True)
        self._recovery.start()

    def _recover(self, reason: str) -> None:
        survivors = self._end_session()
        failure = reason
        if self.reconnect_timeout > 0:
            deadline = time.monotonic() + self.reconnect_timeout
            delay = 0.05
            while self.state is DeviceState.RECOVERING:
                try:
                    self._reconnect()
                except DeviceChanged as e:
                    failure = f"{reason}; reconnecting failed: {e}"
                    break
                except Exception as e:  # noqa: BLE001 - any failure: retry, then give up
                    failure = f"{reason}; reconnecting failed: {e}"
                    if time.monotonic() + delay > deadline:
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                self._resubmit_all(survivors, reason)
                return
        with self._cond:
            if self.state is DeviceState.RECOVERING:
                self.state = DeviceState.FAILED
            self.failure = failure
            self._cond.notify_all()
        log.error("vblk: device %s failed: %s", self.connector.target, failure)
        self._fail_all(survivors, RequestError(f"device lost: {failure}", errno.EIO))

    def _reconnect(self) -> None:
        transport = self.connector.connect()
        try:
            assert self._info is not None
            check_same_device(self._info, identify(transport), self._num_queues)
            self._begin(transport)
        except BaseException:
            transport.close()
            raise

    def _resubmit_all(self, survivors: list[RequestSlot], reason: str) -> None:
        self.reconnects += 1
        log.warning("vblk: reconnected to %s, resubmitting %d request(s)",
                    self.connector.target, len(survivors))
        again = []
        for slot in survivors:
            slot.attempts += 1
            if slot.attempts > MAX_ATTEMPTS:
                self._fail_all([slot], RequestError(f"request lost {slot.attempts} sessions "
                                                    f"in a row (last: {reason})", errno.EIO))
            else:
                again.append(slot)
        assert self._session is not None
        self._session.resubmit(again)
        with self._cond:
            if self.state is DeviceState.RECOVERING:
                self.state = DeviceState.CONNECTED
            self._cond.notify_all()

    def _fail_all(self, slots: list[RequestSlot], error: Exception) -> None:
        for slot in slots:
            assert self._session is not None
            self._session.fail(slot, error)

    # --- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Become CLOSED, end the session and fail what was still in flight with EIO
        (nothing if the device was already closed)."""
        with self._cond:
            if self.state is DeviceState.CLOSED:
                return
            self.state = DeviceState.CLOSED
            self._cond.notify_all()
        recovery = self._recovery
        if recovery is not None and recovery is not threading.current_thread():
            recovery.join()
        self._fail_all(self._end_session(), RequestError("the device was closed", errno.EIO))
