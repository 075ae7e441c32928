"""A fake vhost-user-blk back-end on a unix socket, with fault injection.

``FakeVhostUserBlk`` speaks the device side of vhost-user (docs/interop/vhost-user.rst) well
enough for ``vblk_core.BlockDevice``, the way qemu-storage-daemon 7.2 does (see
/work/shared/docs/vhost-user-blk-facts.md): SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
GET_QUEUE_NUM, GET_CONFIG, SET_FEATURES, SET_MEM_TABLE (the memfd arrives as SCM_RIGHTS and is
mmapped: the shared memory is the real thing), SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE, and
REPLY_ACK acks.  It is written from the specs, independently of vblk_core: the only things it
shares with the driver are the socket, the memfd and the eventfds.

One thread does everything: it waits in poll() on the listening socket or the connection, the
kick eventfds and a stop eventfd; it serves virtio-blk requests (IN, OUT, FLUSH, GET_ID,
DISCARD, WRITE_ZEROES) against a bytearray ``disk``, writes the used ring (and avail_event with
EVENT_IDX) and signals the call eventfd when the driver asked for it.  One front-end at a time;
when it disconnects, the next one is accepted (full handshake each time), like the daemon.

Anything the *driver* does wrong (a message the spec forbids, a descriptor outside the shared
memory, a queue index out of range, a descriptor longer than size_max, more data descriptors than
seg_max, more discard/write-zeroes segments or sectors than the config allows, a request not
aligned to blk_size, a FLUSH/DISCARD/WRITE_ZEROES whose feature was not negotiated, a write to a
read-only device) is recorded in ``violations``, so a test of a healthy device also checks the
driver.  Every request served is recorded in ``served`` (a ``Served``: queue, type, sector,
length, discard/write-zeroes segments with their flags (UNMAP), descriptor counts, status), before
its completion is published: a test can assert which device requests an NBD command became.

    fake = FakeVhostUserBlk(tmp_path / "vu.sock", bytearray(4 << 20), num_queues=2).start()
    dev = vblk_core.BlockDevice.open(vblk_core.VhostUserConnector(fake.path), ...)
    ...
    dev.close(); fake.stop()

Other knobs: ``read_only`` (offer VIRTIO_BLK_F_RO), ``signal_always`` (signal the call eventfd
after every batch, ignoring used_event / NO_INTERRUPT: spurious calls, as the daemon makes).

Faults (constructor keywords; each fake counts what it injected in ``injected`` and the module
counts them all in ``INJECTED``):

control plane
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
    config={field: v}    config-space overrides (capacity in sectors, blk_size, seg_max, ...)
    config_reply=...     "empty" (GET_CONFIG answered with an empty payload), "short_header",
                         "wrong_offset", "oversize" (more bytes than asked)
    stray_fds=N          attach N fds (fresh memfds named "stray") to every reply
    unsolicited_after_handshake  send a stray message once the last ring is enabled
    close_after_handshake        close the connection once the last ring is enabled
                         ("the last ring": expect_queues rings, default min(num_queues, 4),
                         what BlockDevice enables by default; ``handshake_done`` is set then)

data plane (``io_fault`` is injected io_fault_count times (None: forever), starting with the
first request it applies to whose number, counted from 0 over the fake's lifetime and all its
queues, is at least io_fault_at; "short_read" applies to reads only, "replay" needs an earlier
completion on the queue)
    "id_out_of_range"    the used entry names descriptor queue_size + 7
    "double_complete"    serve the request, then publish its id twice in one used-idx update
    "replay"             don't serve it; publish the previous completion's id and len again
    "len_too_big"        report 4096 bytes more than the chain lets the device write
    "short_read"         for IN: write only ``short_bytes`` of data, report short_bytes + 1,
                         status OK (the rest of the buffer keeps whatever was there)
    "bad_status"         serve it, write status ``bad_status`` (default 7)
    "no_status"          serve it, report the full length, never write the status byte
    "used_idx_jump"      serve it, then move used idx by 1000
    "drop"               consume it and never complete it
    "disconnect"         close the connection when it arrives (it stays in flight), keep
                         listening for the next front-end
    "vanish"             like disconnect, but also stop listening, unlink the socket and end the
                         thread: a device that is gone (a fresh fake may take the path)
    "resize_memory"      before serving it, try to shrink, grow and seal the memory file of every
                         region (memory_attack.attack); what each attempt got is appended to
                         ``memory_attacks``, then the request is served normally
"""
from __future__ import annotations

import collections
import enum
import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

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

# Feature bits (virtio 1.x / virtio-blk)
F_SIZE_MAX, F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_TOPOLOGY, F_CONFIG_WCE, F_MQ = (
    1, 2, 5, 6, 9, 10, 11, 12)
F_DISCARD, F_WRITE_ZEROES, F_EVENT_IDX, F_PROTOCOL_FEATURES, F_VERSION_1 = 13, 14, 29, 30, 32

#: what qemu-storage-daemon 7.2 offers (writable export)
QSD_FEATURES = 0x175007e46
#: MQ, LOG_SHMFD, REPLY_ACK, BACKEND_REQ, PAGEFAULT, CONFIG, BACKEND_SEND_FD, HOST_NOTIFIER,
#: CONFIGURE_MEM_SLOTS, as the daemon offers
QSD_PROTOCOL_FEATURES = 0x8f2b

# --- virtio ring and virtio-blk --------------------------------------------------------------

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4
BLK_HDR = struct.Struct("<IIQ")
BLK_SEG = struct.Struct("<QII")
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
REQUEST_NAMES = {T_IN: "read", T_OUT: "write", T_FLUSH: "flush", T_GET_ID: "get_id",
                 T_DISCARD: "discard", T_WRITE_ZEROES: "write_zeroes"}
WZ_FLAG_UNMAP = 1
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512

# struct virtio_blk_config (virtio 1.2, 5.2.4), field by field: name, offset, struct code
CONFIG_FIELDS = [
    ("capacity", 0, "Q"), ("size_max", 8, "I"), ("seg_max", 12, "I"),
    ("cylinders", 16, "H"), ("heads", 18, "B"), ("sectors", 19, "B"),
    ("blk_size", 20, "I"), ("physical_block_exp", 24, "B"), ("alignment_offset", 25, "B"),
    ("min_io_size", 26, "H"), ("opt_io_size", 28, "I"), ("writeback", 32, "B"),
    ("num_queues", 34, "H"), ("max_discard_sectors", 36, "I"), ("max_discard_seg", 40, "I"),
    ("discard_sector_alignment", 44, "I"), ("max_write_zeroes_sectors", 48, "I"),
    ("max_write_zeroes_seg", 52, "I"), ("write_zeroes_may_unmap", 56, "B"),
]
CONFIG_SIZE = 60
SERIAL = b"fake_vhost_blk\0"

IO_FAULTS = ("id_out_of_range", "double_complete", "replay", "len_too_big", "short_read",
             "bad_status", "no_status", "used_idx_jump", "drop", "disconnect", "vanish",
             "resize_memory")
BAD_REPLIES = ("code", "flags", "version", "short", "huge", "truncated", "nack", "trickle")
#: "trickle": each byte of the reply comes well within a control timeout of 1 s, the whole
#: reply (20 bytes for GET_FEATURES) far beyond it
TRICKLE_SECONDS = 0.5

#: every fault injected by any fake in this process, by kind
INJECTED: collections.Counter = collections.Counter()


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event()."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class _Region:
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
        # 16-bit ring words are read and written whole: struct packs and unpacks byte by byte,
        # and a torn index would look like a ring that moved by ~65535 entries
        self.words = self.view[:size // 2 * 2].cast("H")

    def close(self) -> None:
        self.words.release()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:
            pass  # a stray slice is still alive: the mapping goes when it does
        os.close(self.fd)


class _Vring:
    def __init__(self) -> None:
        self.num = 0
        self.last_avail = 0
        self.used_idx = 0
        self.addr: tuple | None = None      # (desc, used, avail) as (_Region, offset) pairs
        self.call_fd = -1
        self.kick_fd = -1
        self.enabled = False
        self.broken = False
        self.last_completion: tuple[int, int] | None = None

    def close(self) -> None:
        for fd in (self.call_fd, self.kick_fd):
            if fd >= 0:
                os.close(fd)
        self.call_fd = self.kick_fd = -1


class _Drop(Exception):
    """Close the connection now."""


class FakeVhostUserBlk:
    """A vhost-user-blk back-end thread on ``path`` serving ``disk`` (a bytearray, shared by
    reference so a replacement fake can serve the same data).  ``start()`` it (or use it as a
    context manager); ``stop()`` closes every socket and fd, unlinks the path and joins."""

    def __init__(self, path, disk: bytearray | int = 1 << 20, *, num_queues: int = 1,
                 features: int = QSD_FEATURES, protocol_features: int = QSD_PROTOCOL_FEATURES,
                 queue_num: int | None = None, config: dict | None = None,
                 read_only: bool = False,
                 close_after: int | None = None, silent_from: int | None = None,
                 bad_reply: tuple[int, str] | None = None, config_reply: str | None = None,
                 unsolicited_after_handshake: bool = False, stray_fds: int = 0,
                 close_after_handshake: bool = False,
                 io_fault: str | None = None, io_fault_at: int = 0,
                 io_fault_count: int | None = 1, short_bytes: int = 0,
                 bad_status: int = 7, signal_always: bool = False,
                 expect_queues: int | None = None) -> None:
        self.path = str(path)
        self.disk = bytearray(disk) if isinstance(disk, int) else disk
        assert len(self.disk) % SECTOR == 0
        if read_only:
            features |= 1 << F_RO
        self.features = features
        self.protocol_features = protocol_features
        self.num_queues = num_queues
        self.queue_num = num_queues if queue_num is None else queue_num
        cfg = dict(capacity=len(self.disk) // SECTOR, size_max=0, seg_max=126, blk_size=512,
                   min_io_size=1, opt_io_size=1, writeback=0, num_queues=num_queues,
                   max_discard_sectors=32768, max_discard_seg=1,
                   max_write_zeroes_sectors=32768, max_write_zeroes_seg=1)
        cfg.update(config or {})
        self.config = self._pack_config(cfg)
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
        assert io_fault is None or io_fault in IO_FAULTS, io_fault
        self.io_fault = io_fault
        self.io_fault_at = io_fault_at
        self.io_fault_count = io_fault_count
        self.short_bytes = short_bytes
        self.bad_status_value = bad_status
        self.signal_always = signal_always
        # how many rings the front-end will enable (BlockDevice uses up to 4 by default)
        self.expect_queues = min(num_queues, 4) if expect_queues is None else expect_queues

        # observable state
        self.injected: collections.Counter = collections.Counter()
        self.violations: list[str] = []
        self.messages: list[list[str]] = []   # request names, per connection
        self.connections = 0
        self.requests = 0                     # virtio-blk requests taken from avail rings
        self.completed = 0
        self.ops: collections.Counter = collections.Counter()
        self.served: list[Served] = []        # every request, in the order it was served
        self.memory_attacks: list[dict[str, int]] = []   # "resize_memory": attempt -> errno
        self.negotiated_features: int | None = None
        self.handshakes_done = 0
        self.gone = threading.Event()         # set when the thread has ended
        self.handshake_done = threading.Event()

        self._lock = threading.Lock()         # a full barrier between ring stores and loads
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

    def _inject(self, kind: str) -> None:
        self.injected[kind] += 1
        INJECTED[kind] += 1

    def _violation(self, what: str) -> None:
        self.violations.append(what)

    # --- config space ------------------------------------------------------------------------

    @staticmethod
    def _pack_config(cfg: dict) -> bytes:
        buf = bytearray(CONFIG_SIZE)
        known = {name for name, _, _ in CONFIG_FIELDS}
        unknown = set(cfg) - known
        assert not unknown, f"unknown config fields {unknown}"
        for name, offset, code in CONFIG_FIELDS:
            value = cfg.get(name, 0)
            struct.pack_into("<" + code, buf, offset, value)
        return bytes(buf)

    # --- main loop ---------------------------------------------------------------------------

    def _reset_connection_state(self) -> None:
        self._regions: list[_Region] = []
        self._vrings: dict[int, _Vring] = {}
        self._msg_count = 0
        self._acked_features = 0
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
            self._inject(f"bad_reply:{how}")
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
            self._inject("stray_fds")
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
                self._inject("close_after")
                raise _Drop()
            if flags & 0x3 != F_VERSION or flags & ~(0x3 | F_NEED_REPLY):
                self._violation(f"{name}: flags {flags:#x}")
            silent = self.silent_from is not None and self._msg_count >= self.silent_from
            if silent:
                self._inject("silent")
                return
            reply = self._dispatch(req, name, payload, fds)
            if fds:
                self._violation(f"{name}: {len(fds)} unexpected fd(s)")
            if reply is not None:
                self._reply(req, reply)
            elif flags & F_NEED_REPLY:
                if not self._proto >> P_REPLY_ACK & 1:
                    self._violation(f"{name}: NEED_REPLY without REPLY_ACK negotiated")
                self._reply(req, U64.pack(0))
            if (req == Req.SET_VRING_ENABLE and not self.handshake_done.is_set()
                    and sum(vr.enabled for vr in self._vrings.values()) >= self.expect_queues):
                self.handshakes_done += 1
                self.handshake_done.set()
                if self.close_after_handshake:
                    self._inject("close_after_handshake")
                    raise _Drop()
                if self.unsolicited_after_handshake:
                    self._inject("unsolicited")
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
            self._violation(f"{name} before SET_OWNER")
        if req == Req.GET_FEATURES:
            return U64.pack(self.features)
        if req == Req.GET_PROTOCOL_FEATURES:
            return U64.pack(self.protocol_features)
        if req == Req.SET_PROTOCOL_FEATURES:
            (proto,) = U64.unpack(payload)
            if proto & ~self.protocol_features:
                self._violation(f"SET_PROTOCOL_FEATURES {proto:#x} not offered")
            self._proto = proto
            return None
        if req == Req.GET_QUEUE_NUM:
            return U64.pack(self.queue_num)
        if req == Req.GET_CONFIG:
            return self._get_config(payload)
        if req == Req.SET_FEATURES:
            (feat,) = U64.unpack(payload)
            if feat & ~self.features:
                self._violation(f"SET_FEATURES {feat:#x} includes bits not offered")
            self._acked_features = self.negotiated_features = feat
            return None
        if req == Req.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if req in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.SET_VRING_ENABLE):
            index, value = STATE.unpack(payload)
            vr = self._vring(index, name)
            if req == Req.SET_VRING_NUM:
                if value == 0 or value > 32768 or value & (value - 1):
                    self._violation(f"SET_VRING_NUM {value}")
                vr.num = value
            elif req == Req.SET_VRING_BASE:
                vr.last_avail = vr.used_idx = value
            else:
                vr.enabled = bool(value)
                if vr.enabled:
                    self._serve(index)
            return None
        if req == Req.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = ADDR.unpack(payload)
            vr = self._vring(index, name)
            n = vr.num
            if desc % 16 or used % 4 or avail % 2:
                self._violation("SET_VRING_ADDR: misaligned ring")
                raise _Drop()
            try:
                vr.addr = (self._user(desc, 16 * n), self._user(used, 6 + 8 * n),
                           self._user(avail, 6 + 2 * n))
            except ValueError as e:
                self._violation(f"SET_VRING_ADDR: {e}")
                raise _Drop() from None
            return None
        if req in (Req.SET_VRING_CALL, Req.SET_VRING_KICK):
            (u,) = U64.unpack(payload)
            vr = self._vring(u & 0xFF, name)
            fd = -1
            if not u & VRING_NOFD:
                if len(fds) != 1:
                    self._violation(f"{name} with {len(fds)} fds")
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
        self._violation(f"unexpected request {name}")
        return None

    def _vring(self, index: int, name: str) -> _Vring:
        if index >= self.queue_num or index >= self.num_queues:
            # qemu-storage-daemon: "Invalid queue index", and it drops the connection
            self._violation(f"{name}: invalid queue index {index}")
            raise _Drop()
        return self._vrings.setdefault(index, _Vring())

    def _get_config(self, payload: bytes) -> bytes:
        offset, size, _flags = CFG_HDR.unpack_from(payload)
        how = self.config_reply
        if how is not None:
            self._inject(f"config_reply:{how}")
        if how == "empty" or offset + size > CONFIG_SIZE:
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
            self._violation(f"SET_MEM_TABLE: {nregions} regions, {len(fds)} fds, "
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

    def _barrier(self) -> None:
        self._lock.acquire()
        self._lock.release()

    def _io_fault_now(self, number: int) -> str | None:
        if self.io_fault is None or number < self.io_fault_at:
            return None
        if self.io_fault_count is not None and self.injected[self.io_fault] >= self.io_fault_count:
            return None
        return self.io_fault

    def _serve(self, index: int) -> None:
        """Take everything from the avail ring of queue ``index``, answer it, signal."""
        vr = self._vrings[index]
        if vr.addr is None or not vr.enabled or vr.broken or not vr.num:
            return
        _d, (ureg, uoff), (areg, aoff) = vr.addr
        uw, aw = ureg.words, areg.words
        n = vr.num
        avail_idx_w, avail_ring_w = (aoff + 2) // 2, (aoff + 4) // 2
        used_idx_w, avail_event_w = (uoff + 2) // 2, (uoff + 4 + 8 * n) // 2
        event_idx = bool(self._acked_features >> F_EVENT_IDX & 1)
        old_used = vr.used_idx
        while True:
            avail_idx = aw[avail_idx_w]
            pending = (avail_idx - vr.last_avail) & 0xFFFF
            if pending > n:
                self._violation(f"queue {index}: avail idx moved by {pending} (size {n})")
                vr.broken = True
                break
            if pending == 0:
                if event_idx:
                    # ask to be kicked at the next request, then look again (no lost kick)
                    uw[avail_event_w] = vr.last_avail
                    self._barrier()
                    if aw[avail_idx_w] != vr.last_avail:
                        continue
                break
            head = aw[avail_ring_w + vr.last_avail % n]
            vr.last_avail = (vr.last_avail + 1) & 0xFFFF
            number = self.requests
            self.requests += 1
            fault = self._io_fault_now(number)
            if fault in ("disconnect", "vanish"):
                self._inject(fault)
                if fault == "vanish":
                    self._teardown_listener()
                raise _Drop()
            if fault == "drop":
                self._inject("drop")
                continue
            if fault == "resize_memory":
                self._inject(fault)
                self.memory_attacks.extend(attack(r.fd) for r in self._regions)
                fault = None
            if fault == "replay":
                if vr.last_completion is None:
                    fault = None
                else:
                    self._inject("replay")
                    self._push_used(vr, *vr.last_completion)
                    continue
            if head >= n:
                self._violation(f"queue {index}: avail head {head} out of range")
                vr.broken = True
                break
            entries = self._process(index, vr, head, fault)
            jump = fault == "used_idx_jump"
            for done_head, length in entries:
                # With the jump, the entries and the jump appear in one store of the index:
                # a driver never sees the good entry alone (it would complete it and race).
                self._push_used(vr, done_head, length, publish=not jump)
            if entries:
                vr.last_completion = entries[0]
            if jump:
                self._inject("used_idx_jump")
                vr.used_idx = (vr.used_idx + 1000) & 0xFFFF
                uw[used_idx_w] = vr.used_idx
        if vr.used_idx != old_used:
            self._signal(vr, old_used, event_idx)

    def _push_used(self, vr: _Vring, head: int, length: int, publish: bool = True) -> None:
        assert vr.addr is not None, "only called on a set-up ring"
        _d, (ureg, uoff), _a = vr.addr
        USED_ELEM.pack_into(ureg.view, uoff + 4 + 8 * (vr.used_idx % vr.num), head, length)
        vr.used_idx = (vr.used_idx + 1) & 0xFFFF
        if publish:
            # x86 keeps stores in order: the entry is visible before the index exposing it
            ureg.words[(uoff + 2) // 2] = vr.used_idx
        self.completed += 1

    def _signal(self, vr: _Vring, old_used: int, event_idx: bool) -> None:
        if vr.call_fd < 0:
            return
        self._barrier()
        assert vr.addr is not None, "only called on a set-up ring"
        _d, _u, (areg, aoff) = vr.addr
        if self.signal_always:
            notify = True
        elif event_idx:
            used_event = areg.words[(aoff + 4 + 2 * vr.num) // 2]
            notify = need_event(used_event, vr.used_idx, old_used)
        else:
            notify = not areg.words[aoff // 2] & 1  # VIRTQ_AVAIL_F_NO_INTERRUPT
        if notify:
            os.eventfd_write(vr.call_fd, 1)

    def _chain(self, index: int, vr: _Vring, head: int):
        """The chain at ``head``: lists of readable and writable (view, offset, len) pieces."""
        assert vr.addr is not None, "only called on a set-up ring"
        (dreg, doff), _u, _a = vr.addr
        dmem = dreg.view
        readable, writable = [], []
        i, seen = head, 0
        while True:
            addr, length, flags, nxt = DESC.unpack_from(dmem, doff + 16 * i)
            seen += 1
            if flags & D_INDIRECT:
                raise ValueError("indirect descriptor (INDIRECT_DESC was not negotiated)")
            mem, off = self._guest(addr, length)
            if flags & D_WRITE:
                writable.append((mem, off, length))
            elif writable:
                raise ValueError("device-readable descriptor after a writable one")
            else:
                readable.append((mem, off, length))
            if not flags & D_NEXT:
                return readable, writable
            if nxt >= vr.num or seen >= vr.num:
                raise ValueError(f"descriptor chain at {head} is broken (next {nxt})")
            i = nxt

    @staticmethod
    def _gather(pieces) -> bytes:
        return b"".join(bytes(m[o:o + n]) for m, o, n in pieces)

    @staticmethod
    def _scatter(pieces, data: bytes) -> None:
        pos = 0
        for m, o, n in pieces:
            if pos >= len(data):
                break
            k = min(n, len(data) - pos)
            m[o:o + k] = data[pos:pos + k]
            pos += k

    def _negotiated(self, bit: int) -> bool:
        return bool(self._acked_features >> bit & 1)

    def _check_limits(self, index: int, name: str, readable, writable) -> None:
        """Record what the driver must not do with the chain of a request: a descriptor longer
        than size_max, more data descriptors than seg_max (both when negotiated)."""
        size_max, seg_max = struct.unpack_from("<II", self.config, 8)
        if self._negotiated(F_SIZE_MAX) and size_max:
            longest = max(n for _m, _o, n in readable + writable)
            if longest > size_max:
                self._violation(f"queue {index}: {name} has a {longest}-byte descriptor, more "
                                f"than size_max {size_max}")
        if self._negotiated(F_SEG_MAX) and name in ("read", "write"):
            data = _data_descriptors(readable, writable)
            if data > seg_max:
                self._violation(f"queue {index}: {name} has {data} data descriptors, more than "
                                f"seg_max {seg_max}")

    def _check_segments(self, index: int, name: str, segments, limit_sectors: int,
                        limit_segs: int) -> bool:
        """Discard / write-zeroes segments: count, size, flags and alignment as the config
        allows.  Records violations; returns False if the request must fail."""
        ok = True
        if len(segments) > limit_segs:
            self._violation(f"queue {index}: {name} with {len(segments)} segments, more than "
                            f"{limit_segs}")
            ok = False
        bs = self._block_size()
        for s, cnt, flags in segments:
            if cnt > limit_sectors:
                self._violation(f"queue {index}: {name} of {cnt} sectors, more than "
                                f"{limit_sectors}")
                ok = False
            if (s * SECTOR) % bs or (cnt * SECTOR) % bs:
                self._violation(f"queue {index}: {name} at sector {s}+{cnt} is not aligned to "
                                f"the block size {bs}")
                ok = False
            allowed = WZ_FLAG_UNMAP if name == "write_zeroes" else 0
            if flags & ~allowed:
                self._violation(f"queue {index}: {name} segment flags {flags:#x}")
        return ok

    def _block_size(self) -> int:
        if self._negotiated(F_BLK_SIZE):
            return struct.unpack_from("<I", self.config, 20)[0] or SECTOR
        return SECTOR

    def _process(self, index: int, vr: _Vring, head: int, fault: str | None):
        """Serve one request; return the used entries [(id, len), ...] to publish.  The
        request is recorded in ``served`` before its completion is published."""
        try:
            readable, writable = self._chain(index, vr, head)
        except ValueError as e:
            self._violation(f"queue {index}: {e}")
            vr.broken = True
            return []
        out = self._gather(readable)
        in_len = sum(n for _m, _o, n in writable)
        if len(out) < BLK_HDR.size or in_len < 1:
            self._violation(f"queue {index}: request at {head} has {len(out)} readable and "
                            f"{in_len} writable bytes")
            return [(head, 0)]
        rtype, _prio, sector = BLK_HDR.unpack_from(out)
        body = out[BLK_HDR.size:]
        data_in = in_len - 1
        reply = b""
        status = S_OK
        disk = self.disk
        name = REQUEST_NAMES.get(rtype, "other")
        self.ops[name] += 1
        self._check_limits(index, name, readable, writable)
        segments: tuple[tuple[int, int, int], ...] = ()
        read_only = bool(self.features >> F_RO & 1)
        bs = self._block_size()
        needs = {T_FLUSH: F_FLUSH, T_DISCARD: F_DISCARD, T_WRITE_ZEROES: F_WRITE_ZEROES}
        if rtype in needs and not self._negotiated(needs[rtype]):
            self._violation(f"queue {index}: {name} request, but the feature was not "
                            "negotiated")
            status = S_UNSUPP
        elif rtype in (T_IN, T_OUT) and ((sector * SECTOR) % bs
                                         or (data_in if rtype == T_IN else len(body)) % bs):
            self._violation(f"queue {index}: {name} at sector {sector} of "
                            f"{data_in if rtype == T_IN else len(body)} bytes is not aligned "
                            f"to the block size {bs}")
            status = S_IOERR
        elif rtype == T_IN:
            start = sector * SECTOR
            if data_in % SECTOR or start + data_in > len(disk) or body:
                status = S_IOERR
            else:
                reply = bytes(disk[start:start + data_in])
        elif rtype == T_OUT:
            start = sector * SECTOR
            if read_only:
                self._violation(f"queue {index}: write to a read-only device")
                status = S_IOERR
            elif len(body) % SECTOR or start + len(body) > len(disk) or data_in:
                status = S_IOERR
            else:
                disk[start:start + len(body)] = body
        elif rtype == T_FLUSH:
            pass
        elif rtype == T_GET_ID:
            reply = SERIAL[:data_in]
        elif rtype in (T_DISCARD, T_WRITE_ZEROES):
            segments = tuple(BLK_SEG.unpack_from(body, k)
                             for k in range(0, len(body) - len(body) % BLK_SEG.size,
                                            BLK_SEG.size))
            limit, limit_segs = struct.unpack_from(
                "<II", self.config, 36 if rtype == T_DISCARD else 48)
            if read_only:
                self._violation(f"queue {index}: {name} on a read-only device")
                status = S_IOERR
            elif not body or len(body) % BLK_SEG.size:
                status = S_IOERR
            elif not self._check_segments(index, name, segments, limit, limit_segs):
                status = S_IOERR
            elif any((s + cnt) * SECTOR > len(disk) for s, cnt, _fl in segments):
                status = S_IOERR
            else:
                for s, cnt, _fl in segments:
                    disk[s * SECTOR:(s + cnt) * SECTOR] = bytes(cnt * SECTOR)
        else:
            status = S_UNSUPP
        written = len(reply) + 1
        write_status = True
        if fault == "short_read" and rtype == T_IN and status == S_OK:
            self._inject("short_read")
            reply = reply[:self.short_bytes]
            written = len(reply) + 1
        elif fault == "bad_status":
            self._inject("bad_status")
            status = self.bad_status_value
        elif fault == "no_status":
            self._inject("no_status")
            write_status = False
        self.served.append(Served(
            queue=index, type=name, sector=sector,
            length=data_in if rtype in (T_IN, T_GET_ID) else len(body),
            segments=segments, data_descriptors=_data_descriptors(readable, writable),
            longest_descriptor=max(n for _m, _o, n in readable + writable), status=status))
        # data first, then the status byte (the last writable byte)
        self._scatter(writable, reply)
        if write_status:
            m, o, n = writable[-1]
            m[o + n - 1] = status
        if rtype == T_IN and status == S_OK and fault != "short_read":
            written = data_in + 1
        if fault == "id_out_of_range":
            self._inject("id_out_of_range")
            return [(vr.num + 7, written)]
        if fault == "len_too_big":
            self._inject("len_too_big")
            return [(head, in_len + 4096)]
        if fault == "double_complete":
            self._inject("double_complete")
            return [(head, written), (head, written)]
        return [(head, written)]


def _data_descriptors(readable, writable) -> int:
    """Descriptors of a chain that carry data: all but the 16-byte header (the first readable
    descriptor, if it holds only the header) and the 1-byte status (the last writable one)."""
    n = len(readable) + len(writable)
    if readable and readable[0][2] == BLK_HDR.size:
        n -= 1
    if writable and writable[-1][2] == 1:
        n -= 1
    return n


@dataclass(frozen=True)
class Served:
    """One virtio-blk request as the fake saw it: recorded before its completion is published,
    so once an NBD client has its reply, the requests that served it are in ``served``."""
    queue: int
    type: str                 # read, write, flush, get_id, discard, write_zeroes, other
    sector: int               # the header's sector (read, write)
    length: int               # read/get_id: bytes the device may write; else bytes sent
    segments: tuple[tuple[int, int, int], ...]   # discard/write_zeroes: (sector, count, flags)
    data_descriptors: int     # descriptors carrying data (the header and status not counted)
    longest_descriptor: int
    status: int

    @property
    def unmap(self) -> bool:
        """A write-zeroes that lets the device deallocate (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)."""
        return any(flags & WZ_FLAG_UNMAP for _s, _n, flags in self.segments)

    @property
    def extents(self) -> list[tuple[int, int]]:
        """(byte offset, byte length) the request covers: its data, or its segments."""
        if self.segments:
            return [(s * SECTOR, n * SECTOR) for s, n, _f in self.segments]
        if self.type in ("read", "write"):
            return [(self.sector * SECTOR, self.length)]
        return []

    def __str__(self) -> str:
        where = ",".join(f"{o}+{n}" for o, n in self.extents)
        flags = " unmap" if self.unmap else ""
        return f"{self.type}({where}{flags})"


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)

