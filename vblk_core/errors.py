"""One exception hierarchy for vblk_core.

Every error carries an ``errno`` so the nbdkit adapter can pass it to the NBD client unchanged.

    VblkError
    ├── ConfigError          bad arguments or a configuration the device cannot satisfy
    ├── TransportError       reaching the device failed (its socket, device file or registers)
    │   ├── ConnectError     could not open a session / the handshake failed
    │   ├── ProtocolError    a vhost-user back-end sent something malformed
    │   └── ControlTimeout   a vhost-user back-end did not answer in time
    ├── DeviceError          the device misbehaved (bad used ring, bad config, hung)
    │   └── RingError        it broke the split-ring protocol (carries what completed first)
    ├── DeviceChanged        after a reconnect it is not the same device (no retry helps)
    └── RequestError         one request failed (status from the device, EIO, EROFS, ...)
"""
from __future__ import annotations

import errno as _errno


class VblkError(Exception):
    """Base class.  ``errno`` is what an NBD client should see."""

    errno: int = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class ConfigError(VblkError):
    errno = _errno.EINVAL


class TransportError(VblkError):
    errno = _errno.EIO


class ConnectError(TransportError):
    pass


class ProtocolError(TransportError):
    errno = _errno.EPROTO


class ControlTimeout(TransportError):
    errno = _errno.ETIMEDOUT


class DeviceError(VblkError):
    errno = _errno.EIO


class RingError(DeviceError):
    """The device wrote something invalid into a used ring.  ``completed`` holds the
    (head, written length) entries it completed validly before the bad one: they are done."""

    def __init__(self, message: str, completed: list[tuple[int, int]]) -> None:
        super().__init__(message)
        self.completed = completed


class DeviceChanged(VblkError):
    """A reconnect reached a device that differs from the one in use (``what`` changed from
    ``was`` to ``now``): requests cannot safely continue on it, so recovery stops."""

    def __init__(self, what: str, was: object, now: object) -> None:
        super().__init__(f"the device changed: {what} was {was}, now {now}")
        self.what = what
        self.was = was
        self.now = now


class RequestError(VblkError):
    errno = _errno.EIO
