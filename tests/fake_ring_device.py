"""The tests' virtio-blk device on its rings: ``BlkEmulator`` serves one queue of a
fake_blk.BlkDevice on a fake_ring.FakeRing (every fake transport uses it), ``serve_queue`` runs
one on a thread between a kick eventfd and a call eventfd, and ``FakeVhostBackend`` is a
BlockDevice Connector with the device in this process (no socket, no kernel).

``BlkEmulator.run()`` answers every chain the driver made available (the device's raw_hook,
named fault and policy applied) and says whether the driver wants a notification: its
used_event with EVENT_IDX, else NO_INTERRUPT; ``signal_always`` ignores both, as
qemu-storage-daemon does.  The ring tests also take the ring's and the device's names from
here.
"""
from __future__ import annotations

import mmap
import os
import select
import threading
from dataclasses import dataclass
from typing import Any

from fake_blk import (
    F_EVENT_IDX,
    S_OK,
    T_IN,
    Behaviour,
    BlkDevice,
    BlkRequest,
    Disconnect,
    Policy,
    RawHook,
)
from fake_blk import QSD_FEATURES as QSD_FEATURES
from fake_blk import S_IOERR as S_IOERR
from fake_blk import S_UNSUPP as S_UNSUPP
from fake_blk import qsd_like_config as qsd_like_config
from fake_ring import AVAIL_F_NO_INTERRUPT, Chain, RingFault, need_event
from fake_ring import F_NEXT as F_NEXT
from fake_ring import F_WRITE as F_WRITE
from fake_ring import USED_F_NO_NOTIFY as USED_F_NO_NOTIFY
from fake_ring import FakeRing as FakeRing
from vblk_core.transport import Transport


class BlkEmulator:
    """Queue ``index`` of a BlkDevice, on ``ring``.  (A bare bytearray for ``device`` makes a
    default BlkDevice on it, with ``policy``.)"""

    def __init__(self, ring: FakeRing, device: BlkDevice | bytearray,
                 policy: Policy | None = None, index: int = 0) -> None:
        self.ring = ring
        self.device = device if isinstance(device, BlkDevice) else BlkDevice(device,
                                                                             policy=policy)
        self.index = index
        self.broken = False        # the driver broke the ring: served no more (until a reset)
        self.last_completion: tuple[int, int] | None = None

    @property
    def log(self) -> list[BlkRequest]:
        return self.device.served

    def parse(self, chain: Chain) -> BlkRequest:
        req, _body = self.device.parse(self.index, self.ring, chain)
        assert req is not None, self.device.violations[-1]
        return req

    def run(self) -> bool:
        """Answer everything available; whether the driver wants to be notified of it."""
        old = self.ring.used_idx
        self.serve_all()
        if self.ring.used_idx == old:
            return False
        dev, ring = self.device, self.ring
        dev.barrier()
        if dev.signal_always:
            return True
        if dev.acked_bit(F_EVENT_IDX):
            return need_event(ring.used_event, ring.used_idx, old)
        return not ring.avail_flags & AVAIL_F_NO_INTERRUPT

    def serve_all(self) -> int:
        """Take every chain the driver made available and answer it; returns how many were
        taken.  With EVENT_IDX, asks to be kicked at the next one (then looks once more, so no
        kick is lost).  Raises Disconnect for that fault."""
        dev, ring, taken = self.device, self.ring, 0
        while not self.broken:
            dev.barrier()
            pending = ring.pending()
            if pending > ring.size:
                dev.violation(f"queue {self.index}: avail idx moved by {pending} "
                              f"(size {ring.size})")
                self.broken = True
            elif pending:
                taken += 1
                with dev.lock:
                    self._take(ring.take())
                continue
            elif dev.acked_bit(F_EVENT_IDX):
                ring.set_avail_event(ring.last_avail)
                dev.barrier()
                if ring.pending():
                    continue
            break
        return taken

    def _take(self, head: int) -> None:
        dev, ring = self.device, self.ring
        number = dev.requests
        dev.requests += 1
        fault = dev.fault_due(number)
        if fault in ("disconnect", "vanish", "drop"):
            dev.inject(fault)
            if fault != "drop":
                raise Disconnect(fault)
            return
        if fault == "resize_memory":
            dev.inject(fault)
            dev.attack_memory()
            fault = None
        if fault == "replay" and self.last_completion is not None:
            dev.inject(fault)
            ring.push(*self.last_completion)
            dev.completed += 1
            return
        try:
            chain = ring.walk(head)
            chain.check_request()
        except RingFault as e:
            dev.violation(f"queue {self.index}: {e}")
            self.broken = True
            return
        hook = dev.raw_hook
        if hook is None or not hook(self.index, ring, chain):
            self.serve(chain, None if fault == "replay" else fault)

    def serve(self, chain: Chain, fault: str | None = None) -> None:
        """Answer one chain: do the request, write its data and status, push its used
        entries (the device's policy, or the named ``fault``, may make it misbehave)."""
        dev, ring = self.device, self.ring
        try:
            req, body = dev.parse(self.index, ring, chain)
            if req is None:
                ring.push(chain.head, 0)
                dev.completed += 1
                return
            status, reply = dev.execute(req, body)
            b = dev.behaviour(req, status, fault, ring.size) or Behaviour()
            if b.data_bytes is not None:
                reply = reply[:b.data_bytes]
            used_len = (req.length + 1 if req.type == T_IN and status == S_OK
                        and b.data_bytes is None else len(reply) + 1)
            status = b.status if b.status is not None else status
            used_len = b.used_len if b.used_len is not None else used_len
            req.answer = status if b.write_status else None
            dev.served.append(req)
            self._write_back(chain, reply, b.data_fill, req.answer)
        except RingFault as e:
            dev.violation(f"queue {self.index}: {e}")
            self.broken = True
            return
        entry = (b.used_id if b.used_id is not None else chain.head, used_len)
        for _ in range(b.repeat):
            ring.push(*entry, publish=not b.idx_jump)
        dev.completed += b.repeat
        self.last_completion = entry
        if b.idx_jump:
            # the entries and the jump appear in one store of the index: a driver never sees
            # the good entry alone (it would complete it and race)
            ring.set_used_idx(ring.used_idx + b.idx_jump)

    def _write_back(self, chain: Chain, reply: bytes, fill: int | None,
                    status: int | None) -> None:
        """Data into the chain's writable buffers (``fill`` over all of it but the status
        byte, else ``reply`` from the start), then the status byte (the last writable)."""
        ring, pos = self.ring, 0
        room = chain.writable_bytes - 1
        for d in chain.writable():
            n = min(d.len, room - pos)
            if n <= 0:
                break
            piece = bytes([fill]) * n if fill is not None else reply[pos:pos + n]
            if piece:
                ring.write(d.addr, piece)
            pos += n
        if status is not None:
            last = chain.writable()[-1]
            ring.write(last.addr + last.len - 1, bytes([status]))


def serve_queue(emu: BlkEmulator, call_fd: int, kick_fd: int, stop_fd: int) -> None:
    """Serve ``emu``'s queue until ``stop_fd`` is signalled: at each kick answer everything
    available, then signal ``call_fd`` if the driver wants it.  Closes call_fd and kick_fd at
    the end; an exception goes to the device's ``errors`` (a test asserts they are empty)."""
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
            if emu.run():
                os.eventfd_write(call_fd, 1)
    except BaseException as e:  # noqa: BLE001  (surfaced by the tests through errors)
        emu.device.errors.append(e)
    finally:
        os.close(call_fd)
        os.close(kick_fd)


# --- BlockDevice on the device in this process: no socket, no kernel --------------------------

@dataclass
class FakeConfig:
    """What the in-process back-end offers."""
    features: int
    config: bytes
    num_queues: int = 1
    protocol_features: int = (1 << 0) | (1 << 3) | (1 << 9)


class FakeVhostBackend(BlkDevice):
    """A Connector for ``BlockDevice.open(backend)``: every connect() is a new session, whose
    queues are served on threads (each waits on its kick eventfd, signals the call eventfd).
    ``stop()`` ends the service threads (also done by the session's close())."""

    target = "fake device"

    def __init__(self, offer: FakeConfig, disk: bytearray, policy: Policy | None = None,
                 raw_hook: RawHook | None = None) -> None:
        super().__init__(disk, offer.config, features=offer.features, policy=policy,
                         raw_hook=raw_hook)
        self.offer = offer
        self.sessions: list[_FakeSession] = []

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
        self._memory: Any = None
        self._threads: list[threading.Thread] = []
        self.rings: dict[int, FakeRing] = {}
        self.closed = False

    # the Transport surface BlockDevice uses

    def negotiate(self, driver_features: int) -> int:
        return self.backend.ack_features(self.backend.offer.features & driver_features)

    def read_config(self, size: int) -> bytes:
        return self.backend.offer.config[:size]

    @property
    def max_queues(self) -> int:
        return self.backend.offer.num_queues

    def map_memory(self, memory: Any) -> int:
        self._memory = memory
        self._map = mmap.mmap(memory.fd, memory.size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        return int(memory.user_addr)

    def setup_queue(self, index: int, size: int, desc_addr: int, avail_addr: int,
                    used_addr: int, call_fd: int) -> _Kicker:
        assert self._map is not None and self._memory is not None, "memory first"
        base = self._memory.user_addr
        ring = FakeRing(memoryview(self._map), size, desc_addr - base, avail_addr - base,
                        used_addr - base, base)
        self.rings[index] = ring
        kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        t = threading.Thread(target=serve_queue, args=(BlkEmulator(ring, self.backend, index=index),
                                                       os.dup(call_fd), kick_fd, self._stop),
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


class _Kicker:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def kick(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except OSError:
            pass  # the session closed the fd: the device resubmits after recovery
