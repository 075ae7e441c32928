"""Opening a BlockDevice on a vhost-user socket, the way the driver tests do."""
from __future__ import annotations

from typing import Any

from vblk_core import BlockDevice, VhostUserConnector


def open_device(socket_path: str, *, control_timeout: float = 5.0,
                **options: Any) -> BlockDevice:
    """``BlockDevice.open`` on the vhost-user back-end at ``socket_path``."""
    return BlockDevice.open(VhostUserConnector(socket_path, control_timeout), **options)
