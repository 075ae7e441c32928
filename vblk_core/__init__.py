"""vblk_core: a pure-Python multi-queue virtio-blk driver over vhost-user.

Layers, each only calling downward: layout -> memory -> virtqueue -> virtio_blk ->
vhost_user (transport) -> queues/device (the multi-queue block device).
"""
from .device import BlockDevice, DeviceState
from .errors import (ConfigError, ConnectError, ControlTimeout, DeviceError, ProtocolError,
                     RequestError, TransportError, VblkError)
from .layout import VirtqueueLayout

__all__ = ["BlockDevice", "DeviceState", "VirtqueueLayout", "VblkError", "ConfigError",
           "TransportError", "ConnectError", "ProtocolError", "ControlTimeout", "DeviceError",
           "RequestError"]
