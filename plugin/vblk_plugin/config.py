"""The plugin's configuration keys: parsed and checked here (no nbdkit import) so that every
mistake fails at start-up, before nbdkit listens, with one line naming the key, what is wrong
and how to fix it; and so it can be tested and fuzzed without a server.  README.md documents
the keys for users (nbdkit's Python plugin has no per-plugin --help)."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Protocol

from vblk_core.errors import ConfigError, VblkError
from vblk_core.transport import Connector
from vblk_core.transports.vfio import normalize_pci_address
from vblk_core.virtio_blk import queue_size_problem

from . import placement as placement_mod
from . import stats as stats_mod
from .qsd import AIO_MODES, FORMATS

MAX_QUEUES = 64
#: The keys that name the device; exactly one of them is given.
DEVICE_KEYS = ("socket", "image", "vdpa", "pci")
#: The transport behind each device key (image= starts a qemu-storage-daemon: vhost-user).
TRANSPORTS = {"socket": "vhost-user", "image": "vhost-user", "vdpa": "vhost-vdpa",
              "pci": "vfio-pci"}

KEYS = {
    "socket": "PATH of a running vhost-user-blk back-end's unix socket",
    "image": "PATH of a disk image: start a private qemu-storage-daemon on it",
    "vdpa": "PATH of a vhost-vdpa character device (/dev/vhost-vdpa-N) of a block device",
    "pci": "PCI address (0000:00:04.0) of a virtio-blk function bound to vfio-pci",
    "format": "format of image= (raw or qcow2; default raw)",
    "aio": "I/O engine of the private daemon (threads, io_uring or native; default threads)",
    "num-queues": "virtqueues to use (default: what the device offers, at most 4)",
    "queue-size": "entries per virtqueue, a power of two from 4 to 32768 (default 256)",
    "bounce-buffers": "number of 1 MiB bounce buffers in shared memory (default 64)",
    "stats": "PATH: write per-queue statistics as JSON there (every second and at exit)",
    "reconnect-timeout": "SECONDS to keep reconnecting after the back-end goes away "
                         "(default 30; 0 = fail at once)",
    "request-timeout": "SECONDS a request may take before the device counts as hung "
                       "(default 30)",
    "spin": "MICROSECONDS a request alone on the device watches the used ring before "
            "sleeping (default 50; 0 = off)",
    "placement": "CPUs of nbdkit's threads and the private daemon: split, none or "
                 "NBDKIT_CPUS/DAEMON_CPUS (default split)",
}


def _whole(key: str, value: str, example: int) -> int:
    try:
        return int(value, 0)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a whole number: "
                          f"give e.g. {key}={example}") from None


def _parse_int(key: str, value: str, low: int, high: int) -> int:
    n = _whole(key, value, low)
    if not low <= n <= high:
        raise ConfigError(f"{key}={n} is out of range: use {low} to {high}")
    return n


def _parse_seconds(key: str, value: str, allow_zero: bool) -> float:
    try:
        t = float(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a number of seconds: "
                          f"give e.g. {key}=30") from None
    if t != t or t < 0 or t > 86400 or (t == 0 and not allow_zero):
        low = "0 (off)" if allow_zero else "more than 0"
        raise ConfigError(f"{key}={value} is out of range: use {low} to 86400 seconds")
    return t


@dataclass
class PluginConfig:
    socket: str | None = None
    image: str | None = None
    vdpa: str | None = None
    pci: str | None = None
    format: str = "raw"
    aio: str = "threads"
    num_queues: int | None = None
    queue_size: int = 256
    bounce_buffers: int = 64
    stats: str | None = None
    reconnect_timeout: float = 30.0
    request_timeout: float = 30.0
    spin_us: int = 50
    placement: placement_mod.Placement = field(
        default_factory=lambda: placement_mod.resolve(placement_mod.DEFAULT))
    seen: set[str] = field(default_factory=set)

    def set(self, key: str, value: str) -> None:
        """Apply one key=value.  Raises ConfigError naming the key for anything wrong."""
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"unknown parameter {key!r}: known parameters are {known}")
        if key in self.seen:
            raise ConfigError(f"{key}= given twice: give it once")
        self.seen.add(key)
        if key == "pci":
            self.pci = normalize_pci_address(value, key)
        elif key in ("socket", "image", "vdpa", "stats"):
            if not value:
                raise ConfigError(f"{key}= needs a path")
            if "\0" in value:
                raise ConfigError(f"{key}= must not contain a NUL byte")
            setattr(self, key, os.path.abspath(value))
        elif key == "format":
            if value not in FORMATS:
                raise ConfigError(f"format={value!r} is not supported: "
                                  f"use one of {', '.join(FORMATS)}")
            self.format = value
        elif key == "aio":
            if value not in AIO_MODES:
                raise ConfigError(f"aio={value!r} is not supported: "
                                  f"use one of {', '.join(AIO_MODES)}")
            self.aio = value
        elif key == "num-queues":
            self.num_queues = _parse_int(key, value, 1, MAX_QUEUES)
        elif key == "queue-size":
            n = _whole(key, value, 256)
            problem = queue_size_problem(n)   # the driver's own rule
            if problem:
                raise ConfigError(f"queue-size={n} is not a usable ring size: {problem}")
            self.queue_size = n
        elif key == "bounce-buffers":
            self.bounce_buffers = _parse_int(key, value, 4, 4096)
        elif key == "reconnect-timeout":
            self.reconnect_timeout = _parse_seconds(key, value, True)
        elif key == "request-timeout":
            self.request_timeout = _parse_seconds(key, value, False)
        elif key == "spin":
            self.spin_us = _parse_int(key, value, 0, 10000)
        elif key == "placement":
            self.placement = placement_mod.resolve(value)

    def complete(self) -> None:
        """Check the whole configuration.  Raises ConfigError with the fix."""
        given = [key for key in DEVICE_KEYS if getattr(self, key)]
        if len(given) > 1:
            named = " and ".join(f"{key}=" for key in given)
            raise ConfigError(f"{named} were {'both' if len(given) == 2 else 'all'} given: "
                              "give exactly one "
                              "(socket= for a running vhost-user back-end, image= to start "
                              "one, vdpa= for a vhost-vdpa device, pci= for a vfio-pci "
                              "function)")
        if not given:
            raise ConfigError("no device: give socket=PATH (a running vhost-user-blk back-end), "
                              "image=PATH (a disk image to serve), vdpa=/dev/vhost-vdpa-N or "
                              "pci=DOMAIN:BUS:SLOT.FN (a virtio-blk function bound to vfio-pci)")
        if not self.image:
            for key in ("format", "aio"):
                if key in self.seen:
                    raise ConfigError(f"{key}= only applies with image=, not {given[0]}=")
        if self.vdpa:
            st = _stat_key("vdpa", self.vdpa, "list the vDPA devices with `vdpa dev show` and "
                           "`ls /dev/vhost-vdpa-*` (the vhost_vdpa module must be loaded)")
            if not stat.S_ISCHR(st.st_mode):
                raise ConfigError(f"vdpa={self.vdpa} is not a character device: give "
                                  "/dev/vhost-vdpa-N")
        if self.pci and not os.path.isdir(f"/sys/bus/pci/devices/{self.pci}"):
            raise ConfigError(f"pci={self.pci}: no such PCI device: list them with lspci -D")
        if self.socket:
            st = _stat_key("socket", self.socket, "start the back-end first, e.g. "
                           "qemu-storage-daemon --export "
                           "type=vhost-user-blk,addr.type=unix,addr.path=...")
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"socket={self.socket} is not a unix socket: point it at the "
                                  "vhost-user-blk back-end's socket")
        if self.image:
            st = _stat_key("image", self.image,
                           f"create it first, e.g. truncate -s 1G {self.image}")
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
                raise ConfigError(f"image={self.image} is not a regular file or block device")
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                raise ConfigError(f"image={self.image} is empty: give it a size, e.g. "
                                  f"truncate -s 1G {self.image}")
        if self.stats:
            stats_mod.check_path(self.stats)


def _stat_key(key: str, path: str, fix_if_missing: str) -> os.stat_result:
    """os.stat of the path given as ``key=``.  Raises ConfigError naming the key: with
    ``fix_if_missing`` if the path does not exist, else with the system's reason."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{key}={path} does not exist: {fix_if_missing}") from None
    except OSError as e:
        raise ConfigError(f"{key}={path}: {e.strerror}") from None


class DeviceOffer(Protocol):
    """What the plugin checks about the device behind socket= (vblk_core's DeviceInfo)."""

    @property
    def max_queues(self) -> int: ...


def device_key(cfg: PluginConfig) -> str | None:
    """The device key given (socket, image, vdpa or pci), None if none is."""
    return next((key for key in DEVICE_KEYS if getattr(cfg, key)), None)


def _device_key(cfg: PluginConfig) -> str:
    key = device_key(cfg)
    return f"{key}={getattr(cfg, key)}" if key else "no device"


def device_target(cfg: PluginConfig) -> tuple[str, str]:
    """(transport, target) of the configured device, as descriptions show them:
    ("vhost-user", "/run/vhost.sock"), ("vfio-pci", "0000:00:04.0"); with image=, the image
    and who serves it.  Raises ConfigError if no device is given."""
    key = device_key(cfg)
    if key is None:
        raise ConfigError("no device: give socket=, vdpa= or pci=")
    target = str(getattr(cfg, key))
    if key == "image":
        target += " (private qemu-storage-daemon)"
    return TRANSPORTS[key], target


def check_device(cfg: PluginConfig, info: DeviceOffer) -> None:
    """Check the configuration against what the device offers.  Raises ConfigError with the
    fix."""
    if cfg.num_queues is not None and cfg.num_queues > info.max_queues:
        hint = (f" (qemu-storage-daemon: num-queues={cfg.num_queues} on its export)"
                if cfg.socket else "")
        raise ConfigError(f"num-queues={cfg.num_queues} is more than the {info.max_queues} "
                          f"the device at {_device_key(cfg)} offers: use num-queues="
                          f"{info.max_queues} or fewer, or give the device more queues{hint}")


def connector(cfg: PluginConfig, socket_path: str | None = None,
              timeout: float = 5.0) -> Connector:
    """The driver's Connector for the configured device (``socket_path``: the private
    daemon's socket in image= mode)."""
    if cfg.vdpa:
        from vblk_core.transports.vhost_vdpa import VhostVdpaConnector
        return VhostVdpaConnector(cfg.vdpa, timeout=timeout)
    if cfg.pci:
        from vblk_core.transports.vfio_pci import VfioPciConnector
        return VfioPciConnector(cfg.pci, timeout=timeout)
    from vblk_core import VhostUserConnector
    path = socket_path or cfg.socket
    assert path is not None, "config.complete() ensures a device"
    return VhostUserConnector(path, timeout=timeout)


def probe_device(cfg: PluginConfig, timeout: float = 5.0) -> None:
    """With socket=, vdpa= or pci=: open a session once, read what the device offers, close
    it, and check the configuration against it, all before nbdkit listens.  (A vhost-user
    back-end takes the next front-end after a disconnect, a vDPA or PCI device is reset by
    the next open, so the plugin's real session can follow.)  Raises ConfigError naming the
    device key or the key at fault."""
    if cfg.image:
        return  # the private daemon starts after nbdkit forks
    from vblk_core import probe
    try:
        info = probe(connector(cfg, timeout=timeout))
    except VblkError as e:
        raise ConfigError(f"{_device_key(cfg)}: {e}") from None
    check_device(cfg, info)
