"""vblk_core: a pure-Python multi-queue virtio-blk driver (imports neither nbdkit nor the plugin).

Each module: what it owns | what it may import of vblk_core (only modules above it).

    errors.py      exceptions, each with its errno      | -
    layout.py      split-ring layout, MAX_QUEUE_SIZE    | -
    eventfd.py     eventfd syscalls holding the GIL     | -
    virtio.py      generic virtio feature, status bits  | -
    memory.py      the shared memfd region, address map | errors
    virtqueue.py   one split ring: desc, avail, used    | errors layout
    virtio_blk.py  virtio-blk features, slot, config    | errors layout virtio
    transport.py   Transport/Connector: the interface   | layout
    transports/    the transports (see its __init__)    | errors eventfd layout transport virtio
    device_info.py identify/probe: features, config     | layout transport virtio_blk
    slot.py        RequestSlot (one request, prepared once), | errors virtio_blk virtqueue
                   SlotPool (a queue's free slots)
    queues.py      QueueRunner: publish, reap, wake     | errors eventfd slot transport
                                                          virtio_blk virtqueue
    supervisor.py  sessions: loss, reconnect, recovery  | device_info errors slot transport
    datapath.py    DataPath: region, queues, slots; the | errors layout memory queues slot
                   reads, writes and pieces               transport virtio_blk virtqueue
    device.py      BlockDevice: checks, set-up, verbs   | all of the above but transports/

This __init__ exports the public API, the three transports' connectors included.

``__version__`` is vblk's one version string: the package's (pyproject.toml reads it), the
plugin's (nbdkit --dump-plugin) and ``vblk --version``'s.
"""
__version__ = "0.1.0"

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

__all__ = ["__version__", "BlockDevice", "DeviceState", "DeviceInfo", "DeviceIdentity", "probe",
           "Connector", "Transport", "VhostUserConnector", "VhostUserTransport",
           "VhostVdpaConnector", "VhostVdpaTransport", "VfioPciConnector", "VfioPciTransport",
           "VirtqueueLayout", "VblkError", "ConfigError", "TransportError", "ConnectError",
           "ProtocolError", "ControlTimeout", "DeviceError", "RingError", "DeviceChanged",
           "RequestError"]
