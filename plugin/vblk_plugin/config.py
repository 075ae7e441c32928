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
from vblk_core.virtio_blk import queue_size_problem

from .qsd import AIO_MODES, FORMATS

MAX_QUEUES = 64

KEYS = {
    "socket": "PATH of a running vhost-user-blk back-end's unix socket",
    "image": "PATH of a disk image: start a private qemu-storage-daemon on it",
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
    format: str = "raw"
    aio: str = "threads"
    num_queues: int | None = None
    queue_size: int = 256
    bounce_buffers: int = 64
    stats: str | None = None
    reconnect_timeout: float = 30.0
    request_timeout: float = 30.0
    seen: set[str] = field(default_factory=set)

    def set(self, key: str, value: str) -> None:
        """Apply one key=value.  Raises ConfigError naming the key for anything wrong."""
        if key not in KEYS:
            known = ", ".join(sorted(KEYS))
            raise ConfigError(f"unknown parameter {key!r}: known parameters are {known}")
        if key in self.seen:
            raise ConfigError(f"{key}= given twice: give it once")
        self.seen.add(key)
        if key in ("socket", "image", "stats"):
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

    def complete(self) -> None:
        """Check the whole configuration.  Raises ConfigError with the fix."""
        if self.socket and self.image:
            raise ConfigError("socket= and image= were both given: give exactly one "
                              "(socket= for a running back-end, image= to start one)")
        if not self.socket and not self.image:
            raise ConfigError("no device: give socket=PATH (a running vhost-user-blk back-end) "
                              "or image=PATH (a disk image to serve)")
        if self.socket:
            for key in ("format", "aio"):
                if key in self.seen:
                    raise ConfigError(f"{key}= only applies with image=, not socket=")
            try:
                st = os.stat(self.socket)
            except FileNotFoundError:
                raise ConfigError(f"socket={self.socket} does not exist: start the back-end "
                                  "first, e.g. qemu-storage-daemon --export "
                                  "type=vhost-user-blk,addr.type=unix,addr.path=...") from None
            except OSError as e:
                raise ConfigError(f"socket={self.socket}: {e.strerror}") from None
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(f"socket={self.socket} is not a unix socket: point it at the "
                                  "vhost-user-blk back-end's socket")
        if self.image:
            try:
                st = os.stat(self.image)
            except FileNotFoundError:
                raise ConfigError(f"image={self.image} does not exist: create it first, e.g. "
                                  f"truncate -s 1G {self.image}") from None
            except OSError as e:
                raise ConfigError(f"image={self.image}: {e.strerror}") from None
            if not stat.S_ISREG(st.st_mode) and not stat.S_ISBLK(st.st_mode):
                raise ConfigError(f"image={self.image} is not a regular file or block device")
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                raise ConfigError(f"image={self.image} is empty: give it a size, e.g. "
                                  f"truncate -s 1G {self.image}")
        if self.stats:
            parent = os.path.dirname(self.stats)
            if not os.path.isdir(parent):
                raise ConfigError(f"stats={self.stats}: directory {parent} does not exist")


class DeviceOffer(Protocol):
    """What the plugin checks about the device behind socket= (vblk_core's DeviceInfo)."""

    @property
    def max_queues(self) -> int: ...


def check_device(cfg: PluginConfig, info: DeviceOffer) -> None:
    """Check the configuration against what the device at socket= offers.  Raises
    ConfigError with the fix."""
    if cfg.num_queues is not None and cfg.num_queues > info.max_queues:
        raise ConfigError(f"num-queues={cfg.num_queues} is more than the {info.max_queues} "
                          f"the device at socket={cfg.socket} offers: use num-queues="
                          f"{info.max_queues} or fewer, or give the back-end more queues "
                          f"(qemu-storage-daemon: num-queues={cfg.num_queues} on its export)")


def probe_device(cfg: PluginConfig, timeout: float = 5.0) -> None:
    """With socket=: connect to the back-end once, read what the device offers, disconnect,
    and check the configuration against it, all before nbdkit listens.  (A vhost-user
    back-end takes the next front-end after a disconnect, so the plugin's real session can
    follow.)  Raises ConfigError naming socket= or the key at fault."""
    if not cfg.socket:
        return
    from vblk_core import VhostUserConnector, probe
    try:
        info = probe(VhostUserConnector(cfg.socket, timeout=timeout))
    except VblkError as e:
        raise ConfigError(f"socket={cfg.socket}: {e}") from None
    check_device(cfg, info)
