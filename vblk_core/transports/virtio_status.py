"""The virtio device-status machine (virtio 1.x, 3.1.1) for transports that have a status
register (vhost-vdpa, vfio-pci), and the feature check every transport makes.

A transport supplies its primitives as a ``StatusRegisters`` (the device_status field and
the two feature words, each however its device is reached: an ioctl, a BAR register) and
lets ``VirtioStatus`` walk the device through

    reset (write 0, wait for 0) -> ACKNOWLEDGE -> DRIVER -> features -> FEATURES_OK
        (it must stick) -> ... the transport sets up its queues ... -> DRIVER_OK
        (neither DEVICE_NEEDS_RESET nor FAILED)

and, once running, say why the session is over (``loss_reason``).  Status bits are added
with a read-modify-write, as Linux's virtio_add_status does: the driver never clears a bit
the device set.
"""
from __future__ import annotations

import errno
import time
from collections.abc import Mapping
from typing import Protocol

from ..errors import ConnectError, DeviceError, TransportError
from ..virtio import DeviceStatus, VirtioFeature

#: Why a driver needs each feature it insists on; every transport requires VERSION_1.
LEGACY_REFUSAL = {VirtioFeature.VERSION_1: "legacy devices are not supported"}


def require_features(offered: int, target: str,
                     required: Mapping[VirtioFeature, str] = LEGACY_REFUSAL) -> None:
    """Raise ConnectError (ENOTSUP) naming the first feature of ``required`` (feature ->
    why it is needed) that ``offered`` lacks."""
    for feature, why in required.items():
        if not offered & feature:
            raise ConnectError(f"{target} does not offer VIRTIO_F_{feature.name} (features "
                               f"{offered:#x}): {why}", errno.ENOTSUP)


def feature_names(features: int) -> str:
    """"EVENT_IDX, VERSION_1, bit 12" for a feature word (generic bits by name)."""
    names = [f.name or "" for f in VirtioFeature if features & f]
    known = int(sum(VirtioFeature))
    names += [f"bit {b}" for b in range(64) if features >> b & 1 and not known >> b & 1]
    return ", ".join(names)


class StatusRegisters(Protocol):
    """A transport's primitives: each raises a TransportError (or DeviceError) if the
    device cannot be reached."""

    @property
    def status(self) -> int:
        """The device_status field."""

    @status.setter
    def status(self, value: int) -> None: ...

    def device_features(self) -> int:
        """The 64 feature bits the device offers."""

    def set_driver_features(self, features: int) -> None:
        """Tell the device the feature bits the driver accepts."""


class VirtioStatus:
    """One session's walk through the device status (see the module docstring).  ``target``
    names the device in messages; ``started`` is true once DRIVER_OK held."""

    def __init__(self, registers: StatusRegisters, target: str) -> None:
        self.registers = registers
        self.target = target
        self.started = False

    def reset(self, timeout: float) -> None:
        """Write 0 and wait (at most ``timeout`` seconds) until the status reads 0.  Raises
        ConnectError (ETIMEDOUT) if it does not."""
        self.started = False
        self.registers.status = 0
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while (status := self.registers.status) != 0:
            if time.monotonic() >= deadline:
                gone = " (0xff: is the device still there?)" if status == 0xFF else ""
                raise ConnectError(f"{self.target} did not complete its reset within "
                                   f"{timeout:g}s: device_status stays {status:#x}{gone}",
                                   errno.ETIMEDOUT)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def acknowledge(self) -> None:
        """ACKNOWLEDGE, then DRIVER (after a reset: whatever a previous owner left is gone)."""
        self._add(DeviceStatus.ACKNOWLEDGE)
        self._add(DeviceStatus.DRIVER)

    def negotiate(self, driver_features: int, transport_features: int = 0,
                  required: Mapping[VirtioFeature, str] = LEGACY_REFUSAL) -> int:
        """Accept what the device offers of ``driver_features``, VERSION_1 and
        ``transport_features`` (the transport's own bits), then FEATURES_OK; return the
        accepted set without the transport's bits.  Raises ConnectError (ENOTSUP) if a
        feature of ``required`` is not offered or FEATURES_OK does not stick."""
        offered = self.registers.device_features()
        require_features(offered, self.target, required)
        features = offered & (driver_features | VirtioFeature.VERSION_1 | transport_features)
        self.registers.set_driver_features(features)
        status = self._add(DeviceStatus.FEATURES_OK)
        if not status & DeviceStatus.FEATURES_OK:
            raise ConnectError(f"{self.target} did not accept the features {features:#x} "
                               f"({feature_names(features)}): FEATURES_OK did not stick "
                               f"(status {status:#x})", errno.ENOTSUP)
        return features & ~transport_features

    def start(self) -> None:
        """DRIVER_OK.  Raises ConnectError if it does not stick or the device needs a reset
        or failed."""
        status = self._add(DeviceStatus.DRIVER_OK)
        bad = DeviceStatus.DEVICE_NEEDS_RESET | DeviceStatus.FAILED
        if not status & DeviceStatus.DRIVER_OK or status & bad:
            raise ConnectError(f"{self.target} did not start (status {status:#x} after "
                               "DRIVER_OK)")
        self.started = True

    def loss_reason(self) -> str | None:
        """What the status says about a session: why it is over, or None if all is well."""
        try:
            status = self.registers.status
        except (TransportError, DeviceError) as e:
            return f"cannot read the status of {self.target}: {e}"
        if status == 0xFF:
            return f"{self.target} reads status 0xff: removed or not responding"
        if status & DeviceStatus.DEVICE_NEEDS_RESET:
            return f"{self.target} needs a reset (DEVICE_NEEDS_RESET, status {status:#x})"
        if self.started and status & DeviceStatus.FAILED:
            return f"{self.target} was stopped (FAILED, status {status:#x})"
        if self.started and not status & DeviceStatus.DRIVER_OK:
            return f"{self.target} was reset (status {status:#x})"
        return None

    def _add(self, bit: int) -> int:
        """Set ``bit`` on what the status reads; return what it reads afterwards."""
        self.registers.status = self.registers.status | bit
        return self.registers.status
