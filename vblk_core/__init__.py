"""vblk_core: a pure-Python multi-queue virtio-blk driver.

Layers, each only calling downward: layout -> memory -> virtqueue -> virtio / virtio_blk ->
transport (the interface; transports/ holds vhost_user, vhost_vdpa and vfio_pci, which
implement it) -> device_info, request,
queues, supervisor, dispatch, batch -> device (the multi-queue block device).
"""
from .device import BlockDevice
from .device_info import DeviceIdentity, DeviceInfo, probe
from .errors import (
                     ConfigError,
                     ConnectError,
                     ControlTimeout,
                     DeviceChanged,
                     DeviceError,
                     ProtocolError,
                     RequestError,
                     RingError,
                     TransportError,
                     VblkError,
)
from .layout import VirtqueueLayout
from .supervisor import DeviceState
from .transport import Connector, Transport
from .transports.vfio_pci import VfioPciConnector, VfioPciTransport
from .transports.vhost_user import VhostUserConnector, VhostUserTransport
from .transports.vhost_vdpa import VhostVdpaConnector, VhostVdpaTransport

__all__ = ["BlockDevice", "DeviceState", "DeviceInfo", "DeviceIdentity", "probe",
           "Connector", "Transport", "VhostUserConnector", "VhostUserTransport",
           "VhostVdpaConnector", "VhostVdpaTransport", "VfioPciConnector", "VfioPciTransport",
           "VirtqueueLayout", "VblkError", "ConfigError", "TransportError", "ConnectError",
           "ProtocolError", "ControlTimeout", "DeviceError", "RingError", "DeviceChanged",
           "RequestError"]
