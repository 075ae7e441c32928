"""vhost-user front-end transport (qemu docs/interop/vhost-user.rst) over a unix socket.

A ``VhostUserTransport`` is one control connection with an explicit state:

    CONNECTING --negotiate()/setup_queue()/start()--> READY --close() or any error--> CLOSED

Each exchange (a message and its reply) must finish within the timeout as a whole: a back-end
that stops reading cannot block a send, one that answers a byte at a time cannot stretch a reply
past it (a busy back-end answers nobody else).  Every reply is checked (request code, flags,
size); fds a back-end attaches to a reply are never received (the kernel closes them); a closed
connection is EPIPE, never SIGPIPE.  Every failure raises a TransportError subclass that says
what failed.  Once CLOSED a session is never reused: make a new one.
"""
from __future__ import annotations

import enum
import errno
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..errors import ConnectError, ControlTimeout, ProtocolError, TransportError
from ..eventfd import EventfdKicker
from ..transport import Kicker, MemoryMap, Transport
from .virtio_status import require_features


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24


PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
WANTED_PROTOCOL_FEATURES = ((1 << PROTOCOL_F_MQ) | (1 << PROTOCOL_F_REPLY_ACK)
                            | (1 << PROTOCOL_F_CONFIG))

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
VRING_NOFD = 0x100

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")
MAX_PAYLOAD = 4096 + CONFIG_HEADER.size


class SessionState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    CLOSED = "closed"


@dataclass(frozen=True)
class MemoryRegion:
    """One SET_MEM_TABLE entry: guest address, size, our user address, offset in ``fd``."""
    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    fd: int


#: vhost-user's own feature bit (in the virtio feature word): the back-end speaks protocol
#: features, which this front-end needs (CONFIG, to read the capacity).
VHOST_USER_F_PROTOCOL_FEATURES = 30


class VhostUserConnector:
    """Connects to a vhost-user-blk back-end's unix socket; every reconnect is a new
    connection to the same path (the back-end may have restarted)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self.target = VhostUserTransport.describe(path)

    def connect(self) -> VhostUserTransport:
        return VhostUserTransport(self.path, self.timeout)


class VhostUserTransport(Transport):
    """One vhost-user control connection (a Transport).  Methods are serialized by a lock.

    The back-end maps our memfd; device ("guest") addresses equal our user addresses.
    """

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        """Connect to the back-end's unix socket.

        Raises ConnectError naming the path if it does not exist or nobody listens.
        """
        self.path = path
        self.target = self.describe(path)
        self.timeout = timeout
        self.state = SessionState.CONNECTING
        self.protocol_features = 0
        self._num_queues = 1
        self._kick_fds: list[int] = []
        self._lock = threading.Lock()
        self._deadline = 0.0    # when the current exchange must be over (monotonic)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except FileNotFoundError:
            self._sock.close()
            self.state = SessionState.CLOSED
            raise ConnectError(f"vhost-user socket {path} does not exist: start the back-end "
                               "(e.g. qemu-storage-daemon --export type=vhost-user-blk,...) "
                               "or fix socket=", errno.ENOENT) from None
        except OSError as e:
            self._sock.close()
            self.state = SessionState.CLOSED
            raise ConnectError(f"cannot connect to vhost-user socket {path}: {e.strerror or e}",
                               e.errno or errno.EIO) from None

    @staticmethod
    def describe(path: str) -> str:
        """How messages name the back-end at ``path`` (the transport's and its connector's
        ``target``)."""
        return f"vhost-user socket {path}"

    # --- framing -------------------------------------------------------------------------

    def _fail(self, exc: TransportError) -> TransportError:
        if self.state is SessionState.CONNECTING and type(exc) is TransportError:
            exc = ConnectError(f"vhost-user handshake with {self.path} failed: {exc}", exc.errno)
        self.close()
        return exc

    def _timed_out(self, request: Request, verb: str) -> TransportError:
        """Close; the ControlTimeout saying the back-end did not ``verb`` ``request``."""
        hint = " (is another front-end connected to it?)" if verb == "answer" else ""
        return self._fail(ControlTimeout(
            f"vhost-user back-end at {self.path} did not {verb} {request.name} within "
            f"{self.timeout:g}s{hint}"))

    def _time_left(self, request: Request, verb: str) -> None:
        """Give the socket what is left of the exchange's time.  Raises ControlTimeout (and
        closes) if nothing is left."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out(request, verb)
        self._sock.settimeout(left)

    def _send(self, request: Request, payload: bytes = b"", fds: list[int] | None = None,
              need_reply: bool = False) -> None:
        """Send one message; this starts an exchange (the reply, if any, shares its time)."""
        if self.state is SessionState.CLOSED:
            raise TransportError(f"vhost-user session to {self.path} is closed")
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload)) + payload
        self._deadline = time.monotonic() + self.timeout
        try:
            sent = 0
            while sent < len(data):
                self._time_left(request, "accept")
                if fds and not sent:
                    sent = socket.send_fds(self._sock, [data], fds, socket.MSG_NOSIGNAL)
                else:
                    sent += self._sock.send(data[sent:], socket.MSG_NOSIGNAL)
        except TimeoutError:
            raise self._timed_out(request, "accept") from None
        except OSError as e:
            raise self._fail(TransportError(
                f"sending {request.name} to {self.path} failed: {e.strerror or e}")) from None

    def _recv_exact(self, n: int, request: Request) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._time_left(request, "answer")
            try:
                chunk = self._sock.recv(n - len(buf))
            except TimeoutError:
                raise self._timed_out(request, "answer") from None
            except OSError as e:
                raise self._fail(TransportError(
                    f"reading the reply to {request.name} from {self.path} failed: "
                    f"{e.strerror or e}")) from None
            if not chunk:
                raise self._fail(TransportError(
                    f"vhost-user back-end at {self.path} closed the connection while we waited "
                    f"for the reply to {request.name}"))
            buf += chunk
        return bytes(buf)

    def _recv_reply(self, request: Request) -> bytes:
        code, flags, size = HEADER.unpack(self._recv_exact(HEADER.size, request))
        if code != request:
            raise self._fail(ProtocolError(
                f"back-end answered {request.name} with a reply to request {code}"))
        if flags & ~0x7 or not flags & FLAG_REPLY or flags & 0x3 != FLAG_VERSION:
            raise self._fail(ProtocolError(
                f"back-end reply to {request.name} has flags {flags:#x}"))
        if size > MAX_PAYLOAD:
            raise self._fail(ProtocolError(
                f"back-end reply to {request.name} claims a {size}-byte payload"))
        return self._recv_exact(size, request) if size else b""

    def _call_u64(self, request: Request) -> int:
        with self._lock:
            self._send(request)
            payload = self._recv_reply(request)
        if len(payload) != U64.size:
            raise self._fail(ProtocolError(
                f"back-end reply to {request.name} is {len(payload)} bytes, expected 8"))
        value: int = U64.unpack(payload)[0]
        return value

    def _command(self, request: Request, payload: bytes = b"",
                 fds: list[int] | None = None) -> None:
        """Send a message that has no reply of its own; wait for an ack if REPLY_ACK is on."""
        ack = bool(self.protocol_features >> PROTOCOL_F_REPLY_ACK & 1)
        with self._lock:
            self._send(request, payload, fds, need_reply=ack)
            if not ack:
                return
            reply = self._recv_reply(request)
        if len(reply) != U64.size:
            raise self._fail(ProtocolError(
                f"back-end ack for {request.name} is {len(reply)} bytes, expected 8"))
        if U64.unpack(reply)[0] != 0:
            raise self._fail(TransportError(f"back-end refused {request.name}"))

    # --- the Transport interface ------------------------------------------------------------

    def negotiate(self, driver_features: int) -> int:
        """SET_OWNER, feature and protocol-feature negotiation, queue count, SET_FEATURES.

        Raises ConnectError if the back-end lacks VERSION_1, PROTOCOL_FEATURES or the CONFIG
        protocol feature, ProtocolError on malformed replies, ControlTimeout if it is silent.
        """
        self._command(Request.SET_OWNER)
        offered = self._call_u64(Request.GET_FEATURES)
        try:
            require_features(offered, self.target)
        except ConnectError as e:
            raise self._fail(e) from None
        if not offered >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            raise self._fail(ConnectError(
                f"back-end at {self.path} does not offer VHOST_USER_F_PROTOCOL_FEATURES: "
                "cannot read its config space"))
        proto_offered = self._call_u64(Request.GET_PROTOCOL_FEATURES)
        if not proto_offered >> PROTOCOL_F_CONFIG & 1:
            raise self._fail(ConnectError(
                f"back-end at {self.path} lacks the CONFIG protocol feature: capacity unknown"))
        proto = proto_offered & WANTED_PROTOCOL_FEATURES
        self._command(Request.SET_PROTOCOL_FEATURES, U64.pack(proto))
        self.protocol_features = proto
        if proto >> PROTOCOL_F_MQ & 1:
            num_queues = self._call_u64(Request.GET_QUEUE_NUM)
            if not 1 <= num_queues <= 65535:
                raise self._fail(ProtocolError(f"back-end reports {num_queues} queues"))
            self._num_queues = num_queues
        features = offered & (driver_features | 1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self._command(Request.SET_FEATURES, U64.pack(features))
        return features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)

    @property
    def max_queues(self) -> int:
        return self._num_queues

    def read_config(self, size: int) -> bytes:
        return self.get_config(0, size)

    def map_memory(self, memory: MemoryMap) -> int:
        self.set_mem_table([MemoryRegion(memory.user_addr, memory.size, memory.user_addr, 0,
                                         memory.fd)])
        return memory.user_addr

    def setup_queue(self, index: int, size: int, desc_addr: int, avail_addr: int,
                    used_addr: int, call_fd: int) -> Kicker:
        kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._kick_fds.append(kick_fd)
        self.setup_vring(index, size, desc_addr, used_addr, avail_addr, call_fd, kick_fd)
        return EventfdKicker(kick_fd)

    def start(self) -> None:
        if self.state is SessionState.CONNECTING:
            self.state = SessionState.READY

    def loss_fd(self) -> int:
        return self._sock.fileno() if self.state is not SessionState.CLOSED else -1

    # --- messages ---------------------------------------------------------------------------

    def get_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of device config at ``offset``.  A back-end that answers with an
        empty payload (size not supported) gets a ProtocolError naming the size."""
        with self._lock:
            self._send(Request.GET_CONFIG, CONFIG_HEADER.pack(offset, size, 0) + bytes(size))
            reply = self._recv_reply(Request.GET_CONFIG)
        if len(reply) < CONFIG_HEADER.size:
            raise self._fail(ProtocolError(
                f"back-end answered GET_CONFIG({size} bytes) with a {len(reply)}-byte payload"))
        r_off, r_size, _flags = CONFIG_HEADER.unpack_from(reply)
        data = reply[CONFIG_HEADER.size:]
        if r_off != offset or r_size != len(data) or r_size > size or r_size < 8:
            raise self._fail(ProtocolError(
                f"back-end GET_CONFIG reply is malformed (offset {r_off}, size {r_size}, "
                f"{len(data)} data bytes, asked {size})"))
        return data

    def set_mem_table(self, regions: list[MemoryRegion]) -> None:
        payload = VRING_STATE.pack(len(regions), 0) + b"".join(
            MEM_REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in regions)
        self._command(Request.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def setup_vring(self, index: int, size: int, desc_addr: int, used_addr: int,
                    avail_addr: int, call_fd: int, kick_fd: int) -> None:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK/ENABLE for queue ``index`` (ring starts at 0)."""
        self._command(Request.SET_VRING_NUM, VRING_STATE.pack(index, size))
        self._command(Request.SET_VRING_BASE, VRING_STATE.pack(index, 0))
        self._command(Request.SET_VRING_ADDR,
                      VRING_ADDR.pack(index, 0, desc_addr, used_addr, avail_addr, 0))
        self._command(Request.SET_VRING_CALL, U64.pack(index), [call_fd])
        self._command(Request.SET_VRING_KICK, U64.pack(index), [kick_fd])
        self._command(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))

    def loss_reason(self) -> str | None:
        """Why the session is over, if it is: the back-end closed the connection, the socket
        failed, or the back-end sent a message nobody asked for.  None while all is well."""
        try:
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            return f"the vhost-user connection failed: {e.strerror or e}"
        if not data:
            return "the back-end closed the vhost-user connection"
        return "the back-end sent an unsolicited vhost-user message"

    def close(self) -> None:
        """Close the connection and the kick eventfds (idempotent)."""
        if self.state is not SessionState.CLOSED:
            self.state = SessionState.CLOSED
            try:
                self._sock.close()
            except OSError:
                pass
            for fd in self._kick_fds:
                os.close(fd)
            self._kick_fds.clear()
