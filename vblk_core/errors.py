"""One exception hierarchy for vblk_core.

Every error carries an ``errno`` so the nbdkit adapter can pass it to the NBD client unchanged.

    VblkError
    ├── ConfigError          bad arguments or a configuration the device cannot satisfy
    ├── TransportError       the vhost-user control connection failed
    │   ├── ConnectError     could not connect / the handshake failed
    │   ├── ProtocolError    the back-end sent something malformed
    │   └── ControlTimeout   the back-end did not answer in time
    ├── DeviceError          the device misbehaved (bad used ring, bad config, hung)
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


class RequestError(VblkError):
    errno = _errno.EIO
