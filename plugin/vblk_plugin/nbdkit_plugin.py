# vblk: an nbdkit plugin whose storage is a virtio-blk device (vhost-user, vhost-vdpa or
# vfio-pci).  This file is the plugin: nbdkit's callbacks, adapting its calling conventions.
# Installed, `vblk plugin-path` prints where it is; in a checkout, plugin/plugin.py loads it.
#
# Serve an image (a private qemu-storage-daemon is started and stopped with nbdkit):
#
#   nbdkit -f -U /tmp/vblk.sock python "$(vblk plugin-path)" image=disk.img
#
# Or attach to a running vhost-user-blk back-end (qemu-storage-daemon, SPDK, ...):
#
#   nbdkit -f -U /tmp/vblk.sock python "$(vblk plugin-path)" socket=/tmp/vhost.sock
#
# Or drive a vDPA block device, or a virtio-blk PCI function bound to vfio-pci (see README):
#
#   nbdkit -f -U /tmp/vblk.sock python "$(vblk plugin-path)" vdpa=/dev/vhost-vdpa-0
#   nbdkit -f -U /tmp/vblk.sock python "$(vblk plugin-path)" pci=0000:00:04.0
#
# Then e.g.:  nbdinfo 'nbd+unix:///?socket=/tmp/vblk.sock'
# The keys are documented in README.md ("Configuration keys"); unknown keys are refused.
#
# The driver is vblk_core; the configuration, private daemon and stats file are in vblk_plugin
# beside this file.  One device session per nbdkit process is shared by every NBD connection.
"""nbdkit's callbacks for vblk (the only module of vblk_plugin that imports nbdkit)."""

import errno
import logging
import os
import sys
from typing import Any


def _make_importable() -> None:
    # nbdkit runs this file in Debian's /usr/bin/python3, which knows neither the venv vblk was
    # installed into nor a checkout: put the directories holding vblk_plugin (site-packages, or
    # a checkout's plugin/) and vblk_core (the same site-packages, or the checkout's root)
    # first on sys.path.
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for directory in (parent, os.path.dirname(parent)):
        has_package = any(os.path.isfile(os.path.join(directory, package, "__init__.py"))
                          for package in ("vblk_core", "vblk_plugin"))
        if has_package and directory not in sys.path:
            sys.path.insert(0, directory)


_make_importable()

import nbdkit  # noqa: E402

from vblk_core import BlockDevice, RequestError, VblkError, __version__  # noqa: E402
from vblk_plugin.config import (  # noqa: E402
    DEVICE_KEYS,
    TRANSPORTS,
    PluginConfig,
    connector,
    device_target,
    probe_device,
)
from vblk_plugin.daemon import ManagedDaemon  # noqa: E402
from vblk_plugin.placement import pin_process  # noqa: E402
from vblk_plugin.report import describe, printable  # noqa: E402
from vblk_plugin.stats import StatsWriter  # noqa: E402

__all__ = ["API_VERSION", "dump_plugin", "thread_model", "config", "config_complete",
           "after_fork", "cleanup", "open", "close", "export_description", "get_size",
           "block_size", "is_rotational", "can_multi_conn", "can_write", "can_flush", "can_fua",
           "can_trim", "can_zero", "can_fast_zero", "can_cache", "pread", "pwrite", "flush",
           "trim", "zero"]

API_VERSION = 2
MAX_REQUEST = 64 * 1024 * 1024  # nbdkit's own limit on one NBD request

cfg = PluginConfig()
device: BlockDevice | None = None
daemon: ManagedDaemon | None = None
stats: StatsWriter | None = None
description = ""   # what the export is (export_description), set once the device is open


class _NbdkitLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if record.levelno >= logging.WARNING:
            print(f"nbdkit: python[vblk]: {msg}", file=sys.stderr, flush=True)
        else:
            nbdkit.debug(msg)


_log = logging.getLogger("vblk")
_log.addHandler(_NbdkitLogHandler())
_log.setLevel(logging.INFO)
_log.propagate = False


def _warn(msg: str) -> None:
    _log.warning("vblk: %s", msg)


def _fail(e: VblkError) -> None:
    """Pass a vblk_core error to the client with its errno; nbdkit logs the message.
    Raises RuntimeError (always)."""
    nbdkit.set_error(getattr(e, "errno", errno.EIO) or errno.EIO)
    # A fresh exception without the driver's frames keeps nbdkit's log to the message.
    raise RuntimeError(f"vblk: {e}") from None


def _config_error(e: VblkError) -> None:
    # nbdkit prints any exception a callback raises as a Python traceback.  A configuration
    # mistake deserves one line naming the key and the fix; nothing has started yet (no
    # socket, no threads, no daemon), so leaving at once is safe.
    sys.stderr.write(f"nbdkit: python[vblk]: error: {e}\n")
    sys.stderr.flush()
    os._exit(1)


def dump_plugin() -> None:
    # nbdkit --dump-plugin: key=value lines after nbdkit's and its Python plugin's own.
    transports = ",".join(dict.fromkeys(TRANSPORTS.values()))
    print(f"vblk_version={__version__}\nvblk_transports={transports}", flush=True)


def thread_model() -> Any:
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key: str, value: str) -> None:
    try:
        cfg.set(key, value)
    except VblkError as e:
        _config_error(e)


def config_complete() -> None:
    # Everything that can be checked before nbdkit listens is checked here, including what a
    # socket= back-end offers (a probe connection): after nbdkit has bound its socket, a
    # failure would leave the socket file behind and print a Python traceback.
    try:
        cfg.complete()
        probe_device(cfg)
    except VblkError as e:
        _config_error(e)


def after_fork() -> None:
    # nbdkit forks (when it daemonizes) after get_ready: threads, the device session and the
    # managed daemon must all belong to the final process.
    global device, daemon, stats, description
    try:
        socket_path = None
        if cfg.placement.nbdkit is not None:
            # Every thread nbdkit has now; the ones it starts later inherit the affinity.
            pin_process(os.getpid(), cfg.placement.nbdkit)
        if cfg.image:
            daemon = ManagedDaemon(cfg.image, cfg.format, cfg.num_queues or 4, cfg.aio,
                                   cpus=cfg.placement.daemon)
            daemon.start()
            socket_path = daemon.socket
        device = BlockDevice.open(connector(cfg, socket_path),
                                  num_queues=cfg.num_queues, queue_size=cfg.queue_size,
                                  bounce_buffers=cfg.bounce_buffers,
                                  request_timeout=cfg.request_timeout,
                                  reconnect_timeout=cfg.reconnect_timeout,
                                  spin_seconds=cfg.spin_us / 1e6)
    except VblkError as e:
        _stop_daemon()
        key = next(k for k in DEVICE_KEYS if getattr(cfg, k))
        raise RuntimeError(f"{key}: {e}") from None
    if daemon is not None and cfg.reconnect_timeout > 0:
        daemon.supervise(on_event=_warn)
    # The serial, read once here (not per connection): a device that does not answer GET_ID
    # is still served, described without one.
    serial = None
    try:
        serial = printable(device.get_id())
    except RequestError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EIO):   # the device's answer: it has none
            nbdkit.debug(f"vblk: no serial: {e}")
        else:
            _warn(f"reading the serial (GET_ID) failed: {e}")
    except VblkError as e:   # the device broke the session: the supervisor deals with that
        _warn(f"reading the serial (GET_ID) failed: {e}")
    description = describe(*device_target(cfg), serial)
    nbdkit.debug(f"vblk: {description}: {device.num_queues} of {device.device_queues} queues, "
                 f"queue size {device.queue_size}, capacity {device.capacity}; placement: "
                 f"{cfg.placement.describe()}")
    if cfg.stats:
        stats = StatsWriter(cfg.stats, device.stats, _warn)
        stats.start()


def _stop_daemon() -> None:
    global daemon
    if daemon is not None:
        daemon.stop()
        daemon = None


def cleanup() -> None:
    global device, stats
    if stats is not None:
        stats.stop()
        stats = None
    if device is not None:
        device.close()
        device = None
    _stop_daemon()


def open(readonly: bool) -> BlockDevice:
    # The connection's handle is the device itself (nbdkit passes it to every callback below;
    # nbdkit enforces -r on its own).
    if device is None:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("vblk: the device is not connected")
    return device


def close(h: BlockDevice) -> None:
    pass


def export_description(h: BlockDevice) -> str:
    return description


def get_size(h: BlockDevice) -> int:
    return h.capacity


def block_size(h: BlockDevice) -> tuple[int, int, int]:
    return (h.block_size, max(h.optimal_io_size, 4096), MAX_REQUEST)


def is_rotational(h: BlockDevice) -> bool:
    return False


def can_multi_conn(h: BlockDevice) -> bool:
    return True  # one device session shared by every connection: a flush covers them all


def can_write(h: BlockDevice) -> bool:
    return not h.read_only


def can_flush(h: BlockDevice) -> bool:
    return True


def can_fua(h: BlockDevice) -> Any:
    return nbdkit.FUA_NATIVE


def can_trim(h: BlockDevice) -> bool:
    return h.can_discard


def can_zero(h: BlockDevice) -> bool:
    return True


def can_fast_zero(h: BlockDevice) -> bool:
    return h.can_write_zeroes


def can_cache(h: BlockDevice) -> Any:
    return nbdkit.CACHE_NONE


def pread(h: BlockDevice, buf: bytearray, offset: int, flags: int) -> None:
    try:
        h.pread(buf, offset)
    except VblkError as e:
        _fail(e)


def pwrite(h: BlockDevice, buf: bytes, offset: int, flags: int) -> None:
    try:
        h.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except VblkError as e:
        _fail(e)


def flush(h: BlockDevice, flags: int) -> None:
    try:
        h.flush()
    except VblkError as e:
        _fail(e)


def trim(h: BlockDevice, count: int, offset: int, flags: int) -> None:
    try:
        h.discard(offset, count)
        if flags & nbdkit.FLAG_FUA:
            h.flush()
    except VblkError as e:
        _fail(e)


def zero(h: BlockDevice, count: int, offset: int, flags: int) -> None:
    try:
        h.write_zeroes(offset, count, unmap=bool(flags & nbdkit.FLAG_MAY_TRIM),
                       fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
        if flags & nbdkit.FLAG_FUA:
            h.flush()
    except VblkError as e:
        _fail(e)
