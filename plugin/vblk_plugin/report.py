"""What ``vblk info`` reports about a device, as one JSON object (stable keys, documented in
README.md) or as nbdinfo-style ``key: value`` lines with the same keys; and the one-line
description the plugin gives its export (``describe``).  Pure: nothing here talks to a device
(examine.py does)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vblk_core import DeviceInfo, __version__
from vblk_core.layout import MAX_QUEUE_SIZE
from vblk_core.virtio import VirtioFeature
from vblk_core.virtio_blk import BlkFeature

#: Names of the feature bits the driver has no use for (virtio 1.2 sections 5.2.3 and 6,
#: linux/vhost.h), so that ``vblk info`` names every bit a device offers; the bits the driver
#: knows are named by vblk_core's BlkFeature and VirtioFeature.
OTHER_FEATURES = {
    0: "BARRIER", 4: "GEOMETRY", 7: "SCSI", 15: "LIFETIME", 16: "SECURE_ERASE", 17: "ZONED",
    24: "NOTIFY_ON_EMPTY", 26: "LOG_ALL", 27: "ANY_LAYOUT", 30: "PROTOCOL_FEATURES",
    36: "ORDER_PLATFORM",
    37: "SR_IOV", 38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET",
    41: "ADMIN_VQ",
}
SECTOR = 512


_NAMES = {**OTHER_FEATURES, **{int(f).bit_length() - 1: str(f.name)
                                for f in (*BlkFeature, *VirtioFeature)}}


def feature_names(bits: int) -> list[str]:
    """The names of the set bits of a feature word, lowest bit first ("bit N" if unnamed)."""
    return [_NAMES.get(bit, f"bit {bit}") for bit in range(64) if bits >> bit & 1]


def printable(raw: bytes) -> str:
    """A device-supplied string (the serial) safe to print: printable ASCII as is, anything
    else (and backslash) as a \\xNN escape."""
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


def describe(transport: str, target: str, serial: str | None) -> str:
    """The export's description: "virtio-blk SERIAL via TRANSPORT TARGET" (no serial if the
    device gave none)."""
    return f"virtio-blk {serial + ' ' if serial else ''}via {transport} {target}"


@dataclass(frozen=True)
class DeviceReport:
    """One device as one short session saw it: ``info`` as negotiated by the driver,
    ``offered`` every feature bit the device offers (None if it would not negotiate them
    all), ``alignment_offset`` in logical blocks (None if unknown), ``serial`` printable
    (None if the device did not answer GET_ID: ``serial_problem`` says why)."""
    transport: str
    target: str
    info: DeviceInfo
    offered: int | None
    alignment_offset: int | None
    serial: str | None
    serial_problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        """The stable JSON object of ``vblk info --json`` (sizes in bytes)."""
        cfg = self.info.config
        bs = cfg.block_size
        discard = None
        if cfg.max_discard_sectors:
            discard = {"max_bytes": cfg.max_discard_sectors * SECTOR,
                       "max_segments": cfg.max_discard_seg,
                       "alignment": cfg.discard_sector_alignment * SECTOR}
        write_zeroes = None
        if cfg.max_write_zeroes_sectors:
            write_zeroes = {"max_bytes": cfg.max_write_zeroes_sectors * SECTOR,
                            "max_segments": cfg.max_write_zeroes_seg,
                            "may_unmap": cfg.write_zeroes_may_unmap}
        offered = self.offered
        return {
            "vblk_version": __version__,
            "description": describe(self.transport, self.target, self.serial),
            "transport": self.transport,
            "target": self.target,
            "serial": self.serial,
            "capacity": cfg.capacity,
            "read_only": self.info.read_only,
            "writeback_cache": cfg.writeback,
            "logical_block_size": bs,
            "physical_block_size": bs << cfg.physical_block_exp,
            "alignment_offset": (None if self.alignment_offset is None
                                 else self.alignment_offset * bs),
            "min_io_size": cfg.min_io_size,
            "optimal_io_size": cfg.opt_io_size,
            "size_max": cfg.size_max,
            "seg_max": cfg.seg_max,
            "discard": discard,
            "write_zeroes": write_zeroes,
            "num_queues": self.info.max_queues,
            # vhost-user has no message for it: the transport then says the driver's maximum
            "max_queue_size": (None if self.info.max_queue_size >= MAX_QUEUE_SIZE
                               else self.info.max_queue_size),
            "features_offered": None if offered is None else feature_names(offered),
            "features_negotiated": feature_names(self.info.features),
        }

    def as_text(self) -> str:
        """nbdinfo-style lines: the description, then ``key: value`` for every JSON key."""
        data = self.as_json()
        lines = [f"device: {data['description']}"]
        for key, value in data.items():
            if key in ("description", "vblk_version"):
                continue
            lines.append(f"\t{key}: {_text(key, value, self)}")
        return "\n".join(lines) + "\n"

    def as_json_text(self) -> str:
        return json.dumps(self.as_json(), indent=2) + "\n"


def _text(key: str, value: Any, report: DeviceReport) -> str:
    if value is None:
        if key == "serial":
            return f"(none: {report.serial_problem or 'not answered'})"
        if key == "features_offered":
            return "(unknown: the device would not negotiate them all at once)"
        if key == "max_queue_size":
            return f"(no limit stated below virtio's {MAX_QUEUE_SIZE})"
        return "(none)" if key in ("discard", "write_zeroes") else "(unknown)"
    if key == "serial" and value == "":
        return "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_text(k, v, report)}" for k, v in value.items())
    if isinstance(value, list):
        return " ".join(value)
    if key == "capacity":
        return f"{value} ({human_size(value)})"
    if key == "size_max" and value == 0:
        return "0 (no limit)"
    if key == "optimal_io_size" and value == 0:
        return "0 (not given)"
    return str(value)


def human_size(n: int) -> str:
    """1073741824 -> "1G", 1536 -> "1.5K" (binary units, as nbdinfo prints them)."""
    for unit in ("E", "P", "T", "G", "M", "K"):
        scale = 1 << (10 * ("KMGTPE".index(unit) + 1))
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if n % scale == 0 else f"{value:.1f}{unit}"
    return str(n)
