"""A vhost-user man in the middle for tests: it listens on ``path``, and for each front-end that
connects (one at a time) connects to the real back-end at ``backend_path`` and forwards every
message both ways, whole and with its SCM_RIGHTS fds, until either side hangs up.

It keeps a duplicate of every memory fd a SET_MEM_TABLE carries: the file a back-end receives,
held the way a back-end holds it, for a test to attack (memory_attack.attack) while the real
back-end goes on serving.  ``memory_fds()`` lists the current connection's; all are closed by
``stop()``.

    proxy = VhostUserProxy(tmp / "proxy.sock", qsd.socket).start()
    ... nbdkit socket=<proxy.path> ...
    attack(proxy.memory_fds()[0]); proxy.stop()
"""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
from typing import Self

HEADER = struct.Struct("<III")          # request, flags, payload size
SET_MEM_TABLE = 5
MAX_FDS = 32                            # vhost-user carries at most 8 (the memory regions)


class ProxyError(Exception):
    """A side hung up or sent something that is not a vhost-user message."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProxyError("hung up in the middle of a message")
        buf += chunk
    return bytes(buf)


def _recv_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One whole message (header and payload) and the fds that came with it."""
    data, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    if not data:
        raise ProxyError("hung up")
    try:
        data += _recv_exact(sock, HEADER.size - len(data))
        size = HEADER.unpack(data)[2]
        if size > 1 << 16:
            raise ProxyError(f"a {size}-byte payload")
        return data + _recv_exact(sock, size), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class VhostUserProxy:
    """Forwards vhost-user between front-ends on ``path`` and the back-end at
    ``backend_path`` in one thread; ``messages`` counts what it forwarded from front-ends,
    by request code."""

    def __init__(self, path: str | os.PathLike[str], backend_path: str) -> None:
        self.path = os.fspath(path)
        self.backend_path = backend_path
        self.messages: dict[int, int] = {}
        self.connections = 0
        self._memory_fds: list[int] = []
        self._lock = threading.Lock()
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="test-vhost-user-proxy",
                                        daemon=True)

    def start(self) -> Self:
        self._listen.bind(self.path)
        self._listen.listen(4)
        self._thread.start()
        return self

    def memory_fds(self) -> list[int]:
        """The memory fds of the current front-end's last SET_MEM_TABLE (still owned here)."""
        with self._lock:
            return list(self._memory_fds)

    def stop(self) -> None:
        """Hang up on both sides, close every fd kept, remove the socket.  Idempotent."""
        if self._stop_fd < 0:
            return
        os.eventfd_write(self._stop_fd, 1)
        if self._thread.is_alive():
            self._thread.join(10)
            if self._thread.is_alive():
                raise RuntimeError("the vhost-user proxy thread did not stop")
        self._listen.close()
        os.close(self._stop_fd)
        self._stop_fd = -1
        self._keep([])
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _keep(self, fds: list[int]) -> None:
        with self._lock:
            old, self._memory_fds = self._memory_fds, fds
        for fd in old:
            os.close(fd)

    def _run(self) -> None:
        while True:
            waitables: list[int | socket.socket] = [self._stop_fd, self._listen]
            ready = select.select(waitables, [], [])[0]
            if self._stop_fd in ready:
                return
            front, _ = self._listen.accept()
            back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.connections += 1
            try:
                back.connect(self.backend_path)
                if self._forward(front, back):
                    return
            except (OSError, ProxyError):
                pass     # either side hung up: wait for the next front-end
            finally:
                front.close()
                back.close()
                self._keep([])

    def _forward(self, front: socket.socket, back: socket.socket) -> bool:
        """Forward messages until a side hangs up (ProxyError / OSError); True if stopped."""
        while True:
            waitables: list[int | socket.socket] = [self._stop_fd, front, back]
            ready = select.select(waitables, [], [])[0]
            if self._stop_fd in ready:
                return True
            for src, dst in ((front, back), (back, front)):
                if src not in ready:
                    continue
                data, fds = _recv_message(src)
                try:
                    code = HEADER.unpack_from(data)[0]
                    if src is front:
                        self.messages[code] = self.messages.get(code, 0) + 1
                        if code == SET_MEM_TABLE:
                            self._keep([os.dup(fd) for fd in fds])
                    sent = socket.send_fds(dst, [data], fds) if fds else 0
                    dst.sendall(data[sent:])
                finally:
                    for fd in fds:
                        os.close(fd)
