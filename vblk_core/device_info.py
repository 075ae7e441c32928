"""What a virtio-blk device is: negotiated features, validated config, queue count.

``identify`` runs the first steps of every session (feature negotiation, config read) on a
fresh transport; the block device uses it at set-up and after each reconnect, and ``probe``
lets a caller check a device before committing to it (the plugin does, before nbdkit listens).
"""
from __future__ import annotations

from dataclasses import dataclass

from .layout import MAX_QUEUE_SIZE
from .transport import Connector, Transport
from .virtio_blk import CONFIG_SIZE, DRIVER_FEATURES, BlkFeature, BlockConfig


@dataclass(frozen=True)
class DeviceIdentity:
    """What must not change across a reconnect."""
    capacity: int
    block_size: int
    read_only: bool


@dataclass(frozen=True)
class DeviceInfo:
    """A device as negotiated: ``features`` agreed, ``config`` validated, ``max_queues`` the
    virtqueues it offers (the transport's count, capped by the config's num_queues with MQ),
    ``max_queue_size`` the largest ring it accepts."""
    features: int
    config: BlockConfig
    max_queues: int
    max_queue_size: int = MAX_QUEUE_SIZE

    @property
    def identity(self) -> DeviceIdentity:
        return DeviceIdentity(self.config.capacity, self.config.block_size, self.read_only)

    @property
    def capacity(self) -> int:
        return self.config.capacity

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def read_only(self) -> bool:
        return bool(self.features & BlkFeature.RO)


def identify(transport: Transport) -> DeviceInfo:
    """Negotiate features and read the config on ``transport``.  Raises what the transport
    raises (ConnectError, TransportError) or DeviceError for a config that makes no sense."""
    features = int(transport.negotiate(DRIVER_FEATURES))
    config = BlockConfig.parse(transport.read_config(CONFIG_SIZE), features)
    queues = (min(transport.max_queues, config.num_queues)
              if features & BlkFeature.MQ else 1)
    return DeviceInfo(features, config, queues, transport.max_queue_size)


def probe(connector: Connector) -> DeviceInfo:
    """Connect once, identify the device, disconnect.  Raises as ``identify`` does."""
    transport = connector.connect()
    try:
        return identify(transport)
    finally:
        transport.close()
