"""Generic virtio (1.x) definitions shared by every device type and transport: the feature
bits that are not device-specific (section 6) and the device status bits (section 2.1)."""
from __future__ import annotations

import enum


class VirtioFeature(enum.IntFlag):
    """Transport/ring feature bits (virtio 1.x, section 6), as masks of the 64-bit word."""
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35


class DeviceStatus(enum.IntFlag):
    """The device status field (virtio 1.x, section 2.1): written by the driver as it goes."""
    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


#: virtio device ID of a block device (section 5).
VIRTIO_ID_BLOCK = 2
