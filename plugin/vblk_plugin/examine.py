"""``vblk info``'s look at a device: one short session through the driver, then one more
connect to learn what the device offers.

The session is a ``BlockDevice`` with one small queue and one 4 KiB bounce buffer: the device
negotiated as the plugin would (features, validated config, queue count and size) and its
serial (GET_ID, which needs a running queue).  The second connect offers the device every
feature bit: ``Transport.negotiate`` returns what is negotiated, so offering all of them
returns all the device offers; nothing else is done on it (no ring, no DRIVER_OK) and the next
session resets it as usual.  Every wait is bounded by ``timeout`` (the back-end's answers, the
GET_ID request).
"""
from __future__ import annotations

import errno

from vblk_core import BlockDevice, ConnectError, RequestError
from vblk_core.transport import Connector
from vblk_core.virtio_blk import CONFIG_SIZE, BlkFeature

from .report import DeviceReport, printable

#: Seconds each answer of the device may take (a busy vhost-user back-end never answers).
INFO_TIMEOUT = 3.0
#: Offered to learn the device's whole feature word (transports mask their own bits out).
ALL_FEATURES = (1 << 64) - 1
#: Byte of virtio_blk_config.topology.alignment_offset (virtio 1.2, 5.2.4; in logical
#: blocks): vblk_core's BlockConfig does not keep it, the driver has no use for it.
ALIGNMENT_OFFSET_BYTE = 25


def examine(connector: Connector, transport: str, target: str,
            timeout: float = INFO_TIMEOUT) -> DeviceReport:
    """What the device behind ``connector`` is.  Raises what ``BlockDevice.open`` raises
    (ConnectError, ControlTimeout, ProtocolError, DeviceError for a config that makes no
    sense, ConfigError), or RequestError/DeviceError if GET_ID fails other than by the
    device's refusal; a device that answers GET_ID "unsupported" or "I/O error" simply has no
    serial."""
    dev = BlockDevice.open(connector, num_queues=1, queue_size=16, bounce_buffer_size=4096,
                           bounce_buffers=1, request_timeout=timeout, reconnect_timeout=0)
    serial = problem = None
    try:
        info = dev.info
        assert info is not None, "open() connected it"
        try:
            serial = printable(dev.get_id())
        except RequestError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EIO):
                raise
            problem = str(e)
    finally:
        dev.close()
    offered, alignment = _offered(connector)
    return DeviceReport(transport, target, info, offered, alignment, serial, problem)


def _offered(connector: Connector) -> tuple[int | None, int | None]:
    """(every feature bit the device offers, its alignment offset); (None, None) if it will
    not accept them all at once (FEATURES_OK), which is its right."""
    session = connector.connect()
    try:
        try:
            offered = session.negotiate(ALL_FEATURES)
        except ConnectError:
            return None, None
        raw = session.read_config(CONFIG_SIZE)
    finally:
        session.close()
    alignment = (raw[ALIGNMENT_OFFSET_BYTE]
                 if offered & BlkFeature.TOPOLOGY and len(raw) > ALIGNMENT_OFFSET_BYTE else 0)
    return offered, alignment
