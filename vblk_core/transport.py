"""The interface between the block device and a way of reaching a virtio device.

libblkio's virtio-driver has a ``VirtioTransport`` trait; this is its Python counterpart.  The
split ring, the virtio-blk layer and the multi-queue device only talk to a ``Transport``, so
vhost-user (a unix socket to a back-end process), vhost-vdpa (ioctls on /dev/vhost-vdpa-N)
and vfio-pci (BARs, MSI-X, IOMMU mappings) each fit without touching them.

The life of one transport (one *session* with the device):

    connect() -> negotiate() -> read_config() -> map_memory() -> setup_queue() x N -> start()
        ... I/O: the device's ``kick()`` per queue, completions on each queue's call eventfd ...
    loss_fd() turns readable / loss_reason() says why  ->  close()

A transport is used once.  *Reconnecting* means asking the ``Connector`` for a fresh one: for
vhost-user a new connection to the same socket (the back-end may have restarted), for a kernel
or PCI device a reset of the same device.  The device then maps the same memory again, sets the
rings up at index 0 and resubmits what was in flight.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

from .layout import MAX_QUEUE_SIZE


@dataclass(frozen=True)
class MemoryMap:
    """Memory the device may access: ``size`` bytes of the memfd ``fd``, mapped at
    ``user_addr`` in this process.  The transport decides the address the device uses."""
    fd: int
    user_addr: int
    size: int


class Kicker(Protocol):
    """Notifies the device that a queue has new available entries."""

    def kick(self) -> None: ...


class Transport(abc.ABC):
    """One session with a virtio device.  Every method raises a TransportError subclass
    (ConnectError during set-up) saying what failed; after close() nothing may be called."""

    #: Human-readable target, for messages: "vhost-user socket /run/x.sock".
    target: str

    @abc.abstractmethod
    def negotiate(self, driver_features: int) -> int:
        """Offer ``driver_features`` (virtio feature bits the driver understands); return the
        negotiated set (what the device also offers).  Transport-specific bits are the
        transport's business.  Raises ConnectError if the device lacks VERSION_1."""

    @abc.abstractmethod
    def read_config(self, size: int) -> bytes:
        """The first ``size`` bytes (or fewer, never under 8) of the device config space."""

    @property
    @abc.abstractmethod
    def max_queues(self) -> int:
        """How many virtqueues the transport can set up (the device may offer fewer in MQ)."""

    @property
    def max_queue_size(self) -> int:
        """Largest ring size the device accepts (MAX_QUEUE_SIZE unless the device says less)."""
        return MAX_QUEUE_SIZE

    @abc.abstractmethod
    def map_memory(self, memory: MemoryMap) -> int:
        """Give the device access to ``memory``; return the device address of its first byte
        (every ring and buffer address the driver publishes is that base plus an offset)."""

    @abc.abstractmethod
    def setup_queue(self, index: int, size: int, desc_addr: int, avail_addr: int,
                    used_addr: int, call_fd: int) -> Kicker:
        """Set up virtqueue ``index`` (ring at index 0, device addresses) with completions
        signalled on the eventfd ``call_fd``; return how to notify the device."""

    @abc.abstractmethod
    def start(self) -> None:
        """All queues are set up: let the device run (DRIVER_OK, or its equivalent)."""

    @abc.abstractmethod
    def loss_fd(self) -> int:
        """A file descriptor that turns readable (or hangs up) when the session may be over,
        or -1 if the transport cannot notice loss that way (request timeouts still do)."""

    @abc.abstractmethod
    def loss_reason(self) -> str | None:
        """Why the session is over, if it is (called when loss_fd() is readable); None if
        all is well after all."""

    @abc.abstractmethod
    def close(self) -> None:
        """End the session and release what it holds (idempotent, never raises)."""


class Connector(Protocol):
    """Makes transports to one device: the first session and every reconnect."""

    #: Human-readable target, for messages: "vhost-user socket /run/x.sock".
    target: str

    def connect(self) -> Transport:
        """A new session with the device.  Raises ConnectError (or another TransportError)."""
        ...
