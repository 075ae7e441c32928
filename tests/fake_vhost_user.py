"""A fake vhost-user-blk back-end on a unix socket, with fault injection.

``FakeVhostUserBlk`` speaks the device side of vhost-user (docs/interop/vhost-user.rst) well
enough for ``vblk_core.BlockDevice``, the way qemu-storage-daemon 7.2 does (see
/work/shared/docs/vhost-user-blk-facts.md): SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, GET_CONFIG, SET_FEATURES, SET_MEM_TABLE (the memfd arrives as SCM_RIGHTS and is
mmapped: the shared memory is the real thing), SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE, and
REPLY_ACK acks.  It is written from the specs, independently of vblk_core: the only things it
shares with the driver are the socket, the memfd and the eventfds.

The device behind the protocol is fake_blk's ``BlkDevice`` (this class is one): the
requests, the driver's ``violations``, the ``served`` record, the counters and the data-plane
faults (``io_fault`` and its knobs, ``signal_always``, ...: keyword arguments passed on to it)
are its.  Here: the vhost-user protocol, its faults, and what "disconnect" and "vanish" mean
for a socket.

One thread does everything: it waits in poll() on the listening socket or the connection, the
kick eventfds and a stop eventfd, and serves a queue when it is kicked (and when it is
enabled).  One front-end at a time; when it disconnects, the next one is accepted (full
handshake each time), like the daemon.  A message the spec forbids, a queue index out of range
or a ring outside the shared memory is a violation too.

    fake = FakeVhostUserBlk(tmp_path / "vu.sock", bytearray(4 << 20), num_queues=2).start()
    dev = vblk_core.BlockDevice.open(vblk_core.VhostUserConnector(fake.path))
    ...
    dev.close(); fake.stop()

Other knobs: ``read_only`` (offer VIRTIO_BLK_F_RO), ``config`` (config-space overrides:
capacity in sectors, blk_size, seg_max, ...).

Control-plane faults (counted in ``injected``, and in fake_blk.INJECTED, as the device's):
    close_after=N        close the connection when message N (1-based, per connection) arrives
    silent_from=N        from message N on, read messages but never answer (a hung back-end)
    bad_reply=(REQ, how) answer request REQ (a ``Req``) malformed; how is "code" (another
                         request number), "flags" (no REPLY bit), "version" (version 2),
                         "short" (a 4-byte payload where 8 are due), "huge" (size 0xfffffff0),
                         "truncated" (size 8, only 4 bytes sent, then silence for good),
                         "trickle" (the whole reply, one byte every TRICKLE_SECONDS),
                         "nack" (ack 1)
    features=...         the offered feature bits (e.g. without VERSION_1)
    protocol_features=.. the offered protocol features
    queue_num=N          the GET_QUEUE_NUM answer (default num_queues)
    config_reply=...     "empty" (GET_CONFIG answered with an empty payload), "short_header",
                         "wrong_offset", "oversize" (more bytes than asked)
    stray_fds=N          attach N fds (fresh memfds named "stray") to every reply
    unsolicited_after_handshake  send a stray message once the last ring is enabled
    close_after_handshake        close the connection once the last ring is enabled
                         ("the last ring": expect_queues rings, default min(num_queues, 4),
                         what BlockDevice enables by default; ``handshake_done`` is set then)
The data-plane "disconnect" closes the connection (the request stays in flight) and keeps
listening for the next front-end; "vanish" also stops listening, unlinks the socket and ends
the thread: a device that is gone (a fresh fake may take the path).
"resize_memory" (a data-plane fault of fake_blk's) makes this fake try to shrink, grow and seal
the memory file of every region (memory_attack.attack) before it serves the request; what each
attempt got is appended to ``memory_attacks``.
"""
from __future__ import annotations

import enum
import mmap
import os
import select
import socket
import struct
import threading
import time
from typing import Any

from fake_blk import F_RO, QSD_FEATURES, BlkDevice, Disconnect, qsd_like_config
from fake_ring import FakeRing
from fake_ring_device import BlkEmulator
from memory_attack import attack

# --- vhost-user ------------------------------------------------------------------------------


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25


HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
CFG_HDR = struct.Struct("<III")
F_VERSION, F_REPLY, F_NEED_REPLY = 0x1, 0x4, 0x8
VRING_NOFD = 0x100
P_MQ, P_REPLY_ACK, P_CONFIG = 0, 3, 9

#: MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, PAGEFAULT, CONFIG, BACKEND_SEND_FD, HOST_NOTIFIER,
#: CONFIGURE_MEM_SLOTS, as the daemon offers
QSD_PROTOCOL_FEATURES = 0x8f2b
BAD_REPLIES = ("code", "flags", "version", "short", "huge", "truncated", "nack", "trickle")
#: "trickle": each byte of the reply comes well within a control timeout of 1 s, the whole
#: reply (20 bytes for GET_FEATURES) far beyond it
TRICKLE_SECONDS = 0.5


class _Region:
    """One region of the driver's memory table, mmapped."""

    def __init__(self, guest: int, size: int, user: int, offset: int, fd: int) -> None:
        self.guest, self.size, self.user = guest, size, user
        self.fd = fd       # kept, as a back-end may keep it (the "resize_memory" fault uses it)
        try:
            self.mm = mmap.mmap(fd, size + offset, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self.view = memoryview(self.mm)[offset:offset + size]

    def close(self) -> None:
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a stray slice is still alive: the mapping goes when it does
        os.close(self.fd)


class _Vring:
    def __init__(self) -> None:
        self.num = 0
        self.base = 0                       # SET_VRING_BASE: where both indexes start
        self.emu: BlkEmulator | None = None   # once SET_VRING_ADDR placed the ring
        self.call_fd = -1
        self.kick_fd = -1
        self.enabled = False

    def close(self) -> None:
        for fd in (self.call_fd, self.kick_fd):
            if fd >= 0:
                os.close(fd)
        self.call_fd = self.kick_fd = -1
        if self.emu is not None:
            self.emu.ring.release()
            self.emu = None


class _Drop(Exception):
    """Close the connection now."""


class FakeVhostUserBlk(BlkDevice):
    """A vhost-user-blk back-end thread on ``path`` serving ``disk`` (a bytearray, shared by
    reference so a replacement fake can serve the same data).  ``start()`` it (or use it as a
    context manager); ``stop()`` closes every socket and fd, unlinks the path and joins."""

    def __init__(self, path: Any, disk: bytearray | int = 1 << 20, *, num_queues: int = 1,
                 features: int = QSD_FEATURES, protocol_features: int = QSD_PROTOCOL_FEATURES,
                 queue_num: int | None = None, config: dict[str, int] | None = None,
                 read_only: bool = False,
                 close_after: int | None = None, silent_from: int | None = None,
                 bad_reply: tuple[int, str] | None = None, config_reply: str | None = None,
                 unsolicited_after_handshake: bool = False, stray_fds: int = 0,
                 close_after_handshake: bool = False,
                 expect_queues: int | None = None, **device: Any) -> None:
        disk = bytearray(disk) if isinstance(disk, int) else disk
        super().__init__(disk, qsd_like_config(len(disk), **{"num_queues": num_queues,
                                                              **(config or {})}),
                         features=features | (1 << F_RO if read_only else 0), **device)
        self.path = str(path)
        self.protocol_features = protocol_features
        self.num_queues = num_queues
        self.queue_num = num_queues if queue_num is None else queue_num
        self.close_after = close_after
        self.silent_from = silent_from
        if bad_reply is not None:
            assert bad_reply[1] in BAD_REPLIES, bad_reply
        self.bad_reply = bad_reply
        assert config_reply in (None, "empty", "short_header", "wrong_offset", "oversize")
        self.config_reply = config_reply
        self.unsolicited_after_handshake = unsolicited_after_handshake
        self.stray_fds = stray_fds
        self.close_after_handshake = close_after_handshake
        # how many rings the front-end will enable (BlockDevice uses up to 4 by default)
        self.expect_queues = min(num_queues, 4) if expect_queues is None else expect_queues

        # observable state (and BlkDevice's: served, violations, injected, ops, requests, ...)
        self.messages: list[list[str]] = []   # request names, per connection
        self.connections = 0
        self.memory_attacks: list[dict[str, int]] = []   # "resize_memory": attempt -> errno
        self.negotiated_features: int | None = None
        self.handshakes_done = 0
        self.gone = threading.Event()         # set when the thread has ended
        self.handshake_done = threading.Event()

        self._listen: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._reset_connection_state()

    # --- life cycle --------------------------------------------------------------------------

    def start(self) -> FakeVhostUserBlk:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listen.bind(self.path)
        self._listen.listen(4)
        self._thread = threading.Thread(target=self._run, name=f"fake-vhost-user:{self.path}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, close everything, unlink the socket.  Idempotent."""
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"fake back-end thread on {self.path} did not stop")
            self._thread = None
        self._teardown_listener()
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1

    def wait_gone(self, timeout: float = 5.0) -> bool:
        return self.gone.wait(timeout)

    def __enter__(self) -> FakeVhostUserBlk:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _teardown_listener(self) -> None:
        if self._listen is not None:
            self._listen.close()
            self._listen = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


    # --- main loop ---------------------------------------------------------------------------

    def _reset_connection_state(self) -> None:
        self._regions: list[_Region] = []
        self._vrings: dict[int, _Vring] = {}
        self._msg_count = 0
        self.acked = 0
        self._proto = 0
        self._owner = False

    def _close_connection(self) -> None:
        for vr in self._vrings.values():
            vr.close()
        for r in self._regions:
            r.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._reset_connection_state()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._close_connection()
            self.gone.set()

    def _loop(self) -> None:
        while True:
            poller = select.poll()
            poller.register(self._stop_fd, select.POLLIN)
            if self._conn is None:
                if self._listen is None:
                    return
                poller.register(self._listen.fileno(), select.POLLIN)
            else:
                poller.register(self._conn.fileno(), select.POLLIN)
                for vr in self._vrings.values():
                    if vr.kick_fd >= 0:
                        poller.register(vr.kick_fd, select.POLLIN)
            events = dict(poller.poll())
            if self._stop_fd in events:
                return
            try:
                if self._conn is None:
                    conn, _ = self._listen.accept()
                    conn.settimeout(2.0)  # a message cut short must not block stop()
                    self._conn = conn
                    self.connections += 1
                    self.messages.append([])
                    continue
                if self._conn.fileno() in events:
                    self._handle_message()
                for i, vr in list(self._vrings.items()):
                    if vr.kick_fd >= 0 and vr.kick_fd in events:
                        try:
                            os.eventfd_read(vr.kick_fd)
                        except BlockingIOError:
                            pass
                        self._serve(i)
            except _Drop:
                self._close_connection()
                if self._listen is None:
                    return

    # --- control messages ----------------------------------------------------------------------

    def _recv_exact(self, n: int, want_fds: bool = False) -> tuple[bytes, list[int]]:
        buf, fds = bytearray(), []
        while len(buf) < n:
            if want_fds and not buf:
                try:
                    assert self._conn is not None
                    data, got, _flags, _addr = socket.recv_fds(self._conn, n, 16)
                except OSError:
                    data, got = b"", []
                fds.extend(got)
            else:
                try:
                    data = self._conn.recv(n - len(buf))
                except OSError:
                    data = b""
            if not data:
                for fd in fds:
                    os.close(fd)
                raise _Drop()
            buf += data
        return bytes(buf), fds

    def _send(self, data: bytes) -> None:
        try:
            self._conn.sendall(data)
        except OSError:
            raise _Drop() from None

    def _reply(self, req: int, payload: bytes) -> None:
        code, flags, size = req, F_VERSION | F_REPLY, len(payload)
        bad = self.bad_reply
        if bad is not None and bad[0] == req:
            how = bad[1]
            self.inject(f"bad_reply:{how}")
            if how == "code":
                code = Req.GET_QUEUE_NUM if req != Req.GET_QUEUE_NUM else Req.GET_FEATURES
            elif how == "flags":
                flags = F_VERSION
            elif how == "version":
                flags = 0x2 | F_REPLY
            elif how == "short":
                payload, size = payload[:4], 4
            elif how == "huge":
                size = 0xFFFFFFF0
            elif how == "truncated":
                self._send(HDR.pack(code, flags, size) + payload[:4])
                self.silent_from = 0
                return
            elif how == "nack":
                payload = U64.pack(1)
            elif how == "trickle":
                for byte in HDR.pack(code, flags, size) + payload:
                    self._send(bytes([byte]))
                    time.sleep(TRICKLE_SECONDS)
                return
        if self.stray_fds:
            self.inject("stray_fds")
            fds = [os.memfd_create("stray", os.MFD_CLOEXEC) for _ in range(self.stray_fds)]
            try:
                assert self._conn is not None
                socket.send_fds(self._conn, [HDR.pack(code, flags, size) + payload], fds)
            except OSError:
                raise _Drop() from None
            finally:
                for fd in fds:
                    os.close(fd)
            return
        self._send(HDR.pack(code, flags, size) + payload)

    def _handle_message(self) -> None:
        raw, fds = self._recv_exact(HDR.size, want_fds=True)
        req, flags, size = HDR.unpack(raw)
        try:
            payload = self._recv_exact(size)[0] if size else b""
            self._msg_count += 1
            try:
                name = Req(req).name
            except ValueError:
                name = str(req)
            self.messages[-1].append(name)
            if self.close_after is not None and self._msg_count >= self.close_after:
                self.inject("close_after")
                raise _Drop()
            if flags & 0x3 != F_VERSION or flags & ~(0x3 | F_NEED_REPLY):
                self.violation(f"{name}: flags {flags:#x}")
            silent = self.silent_from is not None and self._msg_count >= self.silent_from
            if silent:
                self.inject("silent")
                return
            reply = self._dispatch(req, name, payload, fds)
            if fds:
                self.violation(f"{name}: {len(fds)} unexpected fd(s)")
            if reply is not None:
                self._reply(req, reply)
            elif flags & F_NEED_REPLY:
                if not self._proto >> P_REPLY_ACK & 1:
                    self.violation(f"{name}: NEED_REPLY without REPLY_ACK negotiated")
                self._reply(req, U64.pack(0))
            if (req == Req.SET_VRING_ENABLE and not self.handshake_done.is_set()
                    and sum(vr.enabled for vr in self._vrings.values()) >= self.expect_queues):
                self.handshakes_done += 1
                self.handshake_done.set()
                if self.close_after_handshake:
                    self.inject("close_after_handshake")
                    raise _Drop()
                if self.unsolicited_after_handshake:
                    self.inject("unsolicited")
                    self._send(HDR.pack(Req.GET_FEATURES, F_VERSION, 0))
        finally:
            for fd in fds:
                os.close(fd)

    def _dispatch(self, req: int, name: str, payload: bytes, fds: list[int]) -> bytes | None:
        """Act on one message; return a reply payload for requests that have one."""
        if req == Req.SET_OWNER:
            self._owner = True
            return None
        if not self._owner and req not in (Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES):
            self.violation(f"{name} before SET_OWNER")
        if req == Req.GET_FEATURES:
            return U64.pack(self.features)
        if req == Req.GET_PROTOCOL_FEATURES:
            return U64.pack(self.protocol_features)
        if req == Req.SET_PROTOCOL_FEATURES:
            (proto,) = U64.unpack(payload)
            if proto & ~self.protocol_features:
                self.violation(f"SET_PROTOCOL_FEATURES {proto:#x} not offered")
            self._proto = proto
            return None
        if req == Req.GET_QUEUE_NUM:
            return U64.pack(self.queue_num)
        if req == Req.GET_CONFIG:
            return self._get_config(payload)
        if req == Req.SET_FEATURES:
            (feat,) = U64.unpack(payload)
            self.negotiated_features = self.ack_features(feat)
            return None
        if req == Req.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if req in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ENABLE):
            index, value = STATE.unpack(payload)
            vr = self._vring(index, name)
            if req == Req.SET_VRING_NUM:
                if value == 0 or value > 32768 or value & (value - 1):
                    self.violation(f"SET_VRING_NUM {value}")
                vr.num = value
            elif req == Req.SET_VRING_BASE:
                vr.base = value
                if vr.emu is not None:
                    vr.emu.ring.last_avail = vr.emu.ring.used_idx = value
            else:
                vr.enabled = bool(value)
                if vr.enabled:
                    self._serve(index)
            return None
        if req == Req.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = ADDR.unpack(payload)
            vr = self._vring(index, name)
            if desc % 16 or used % 4 or avail % 2:
                self.violation("SET_VRING_ADDR: misaligned ring")
                raise _Drop()
            self._place_ring(index, vr, desc, used, avail)
            return None
        if req in (Req.SET_VRING_CALL, Req.SET_VRING_KICK):
            (u,) = U64.unpack(payload)
            vr = self._vring(u & 0xFF, name)
            fd = -1
            if not u & VRING_NOFD:
                if len(fds) != 1:
                    self.violation(f"{name} with {len(fds)} fds")
                    raise _Drop()
                fd = fds.pop()
            if req == Req.SET_VRING_CALL:
                if vr.call_fd >= 0:
                    os.close(vr.call_fd)
                vr.call_fd = fd
            else:
                if vr.kick_fd >= 0:
                    os.close(vr.kick_fd)
                vr.kick_fd = fd
            return None
        if req == Req.SET_CONFIG:
            return None
        self.violation(f"unexpected request {name}")
        return None

    def _vring(self, index: int, name: str) -> _Vring:
        if index >= self.queue_num or index >= self.num_queues:
            # qemu-storage-daemon: "Invalid queue index", and it drops the connection
            self.violation(f"{name}: invalid queue index {index}")
            raise _Drop()
        return self._vrings.setdefault(index, _Vring())

    def _get_config(self, payload: bytes) -> bytes:
        offset, size, _flags = CFG_HDR.unpack_from(payload)
        how = self.config_reply
        if how is not None:
            self.inject(f"config_reply:{how}")
        if how == "empty" or offset + size > len(self.config):
            return b""
        data = self.config[offset:offset + size]
        if how == "short_header":
            return CFG_HDR.pack(offset, size, 0)[:6]
        if how == "wrong_offset":
            return CFG_HDR.pack(offset + 4, size, 0) + data
        if how == "oversize":
            return CFG_HDR.pack(offset, size + 4, 0) + data + bytes(4)
        return CFG_HDR.pack(offset, size, 0) + data

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        nregions, _pad = STATE.unpack_from(payload)
        if len(fds) != nregions or len(payload) != STATE.size + nregions * REGION.size:
            self.violation(f"SET_MEM_TABLE: {nregions} regions, {len(fds)} fds, "
                            f"{len(payload)} bytes")
            raise _Drop()
        for r in self._regions:
            r.close()
        self._regions = []
        for i in range(nregions):
            guest, size, user, offset = REGION.unpack_from(payload, STATE.size + i * REGION.size)
            self._regions.append(_Region(guest, size, user, offset, fds.pop(0)))

    def _user(self, addr: int, length: int) -> tuple[_Region, int]:
        for r in self._regions:
            if r.user <= addr and addr + length <= r.user + r.size:
                return r, addr - r.user
        raise ValueError(f"user address {addr:#x}+{length} is outside the memory table")

    def _guest(self, addr: int, length: int) -> tuple[memoryview, int]:
        for r in self._regions:
            if r.guest <= addr and addr + length <= r.guest + r.size:
                return r.view, addr - r.guest
        raise ValueError(f"guest address {addr:#x}+{length} is outside the memory table")


    # --- the data plane ----------------------------------------------------------------------

    def _serve(self, index: int) -> None:
        """Answer everything on the avail ring of queue ``index``; signal if the driver wants
        it.  The "disconnect" and "vanish" faults drop the connection (raise _Drop)."""
        vr = self._vrings[index]
        if vr.emu is None or not vr.enabled:
            return
        try:
            notify = vr.emu.run()
        except Disconnect as e:
            if e.args[0] == "vanish":
                self._teardown_listener()
            raise _Drop() from None
        if notify and vr.call_fd >= 0:
            os.eventfd_write(vr.call_fd, 1)

    def attack_memory(self) -> None:
        """The "resize_memory" fault: attack the memory file of every region."""
        self.memory_attacks.extend(attack(r.fd) for r in self._regions)

    def _place_ring(self, index: int, vr: _Vring, desc: int, used: int, avail: int) -> None:
        """The ring's three parts (user addresses) in one region of the memory table; data
        buffers are found by guest address in any region.  Raises _Drop if they are not."""
        n = vr.num
        try:
            (region, d), (ureg, u), (areg, a) = (self._user(desc, 16 * n),
                                                 self._user(used, 6 + 8 * n),
                                                 self._user(avail, 6 + 2 * n))
        except ValueError as e:
            self.violation(f"SET_VRING_ADDR: {e}")
            raise _Drop() from None
        if not region is ureg is areg:
            self.violation("SET_VRING_ADDR: the ring's parts are in different regions")
            raise _Drop()
        ring = FakeRing(region.view, n, d, a, u, region.guest, translate=self._guest)
        ring.last_avail = ring.used_idx = vr.base
        if vr.emu is not None:
            vr.emu.ring.release()
        vr.emu = BlkEmulator(ring, self, index=index)


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)
