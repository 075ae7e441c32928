"""ioctls on a device file: request numbers (asm-generic/ioctl.h), their names for messages,
the real system calls, and the one form of a failed call's error.

The kernel transports (vhost_vdpa, vfio) define their request numbers with ``ioc`` and list
them in ``IOCTL_NAMES`` with ``name_ioctls``; their ``Os...Ops`` classes extend ``OsFileOps``
(unit tests put a fake device behind the same methods); ``call`` makes one ioctl and turns an
OSError into a ConnectError (or TransportError) naming the request and, where one is known,
the fix.
"""
from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Mapping
from typing import Protocol

from ..errors import ConnectError, TransportError

# Directions of the generic encoding (x86, arm64, riscv; not powerpc, mips or sparc).
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2


def ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """_IOC(direction, kind, nr, size): the request number of an ioctl."""
    return direction << 30 | size << 16 | kind << 8 | nr


#: Request number -> its name in linux's headers ("VHOST_SET_OWNER"), for messages.
IOCTL_NAMES: dict[int, str] = {}


def name_ioctls(namespace: Mapping[str, object], prefix: str) -> None:
    """Add every integer in ``namespace`` (a module's globals()) whose name starts with
    ``prefix`` to IOCTL_NAMES."""
    IOCTL_NAMES.update({v: k for k, v in namespace.items()
                        if k.startswith(prefix) and isinstance(v, int)})


class IoctlOps(Protocol):
    """The system call ``call`` makes (a fake device's in unit tests)."""

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int: ...


class OsFileOps:
    """The real system calls on a device file: open read-write, ioctl (a bytearray argument
    is updated in place: fcntl.ioctl with bytes would return a copy), close."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: bytearray | int) -> int:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))

    def close(self, fd: int) -> None:
        os.close(fd)


def failure(target: str, step: str, e: OSError, fixes: Mapping[int, str] | None = None,
            cls: type[TransportError] = ConnectError) -> TransportError:
    """The error for ``step`` failing on ``target`` with ``e``: "TARGET: STEP failed: REASON"
    and, if ``fixes`` has one for its errno, ": FIX"; it carries that errno (EIO if none)."""
    fix = (fixes or {}).get(e.errno or 0)
    text = f"{target}: {step} failed: {e.strerror or e}" + (f": {fix}" if fix else "")
    return cls(text, e.errno or errno.EIO)


def call(ops: IoctlOps, fd: int, request: int, arg: bytearray | int, target: str,
         fixes: Mapping[int, str] | None = None, cls: type[TransportError] = ConnectError
         ) -> int:
    """ioctl ``request`` on ``fd``; its result.  Raises ``cls`` (``failure``) naming the
    request if it fails."""
    try:
        return ops.ioctl(fd, request, arg)
    except OSError as e:
        raise failure(target, IOCTL_NAMES.get(request, hex(request)), e, fixes, cls) from None
