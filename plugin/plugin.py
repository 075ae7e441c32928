# vblk: an nbdkit plugin whose storage is a virtio-blk device (vhost-user, vhost-vdpa or
# vfio-pci).
#
# Serve an image (a private qemu-storage-daemon is started and stopped with nbdkit):
#
#   nbdkit -f -U /tmp/vblk.sock python plugin/plugin.py image=disk.img
#
# Or attach to a running vhost-user-blk back-end (qemu-storage-daemon, SPDK, ...):
#
#   nbdkit -f -U /tmp/vblk.sock python plugin/plugin.py socket=/tmp/vhost.sock num-queues=4
#
# Or drive a vDPA block device, or a virtio-blk PCI function bound to vfio-pci (see README):
#
#   nbdkit -f -U /tmp/vblk.sock python plugin/plugin.py vdpa=/dev/vhost-vdpa-0
#   nbdkit -f -U /tmp/vblk.sock python plugin/plugin.py pci=0000:00:04.0
#
# Then e.g.:  nbdinfo 'nbd+unix:///?socket=/tmp/vblk.sock'
# The keys are documented in README.md ("Configuration keys"); unknown keys are refused.
#
# This file holds only nbdkit's callbacks, adapting its calling conventions: the driver is
# vblk_core, the configuration, private daemon and stats file are in vblk_plugin/ beside it.
# One device session per nbdkit process is shared by every NBD connection.

import errno
import logging
import os
import sys

import nbdkit

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from vblk_core import BlockDevice, VblkError  # noqa: E402
from vblk_plugin.config import DEVICE_KEYS, PluginConfig, connector, probe_device  # noqa: E402
from vblk_plugin.daemon import ManagedDaemon  # noqa: E402
from vblk_plugin.placement import pin_process  # noqa: E402
from vblk_plugin.stats import StatsWriter  # noqa: E402

API_VERSION = 2
MAX_REQUEST = 64 * 1024 * 1024  # nbdkit's own limit on one NBD request

cfg = PluginConfig()
device = None
daemon = None
stats = None


class _NbdkitLogHandler(logging.Handler):
    def emit(self, record):
        msg = self.format(record)
        if record.levelno >= logging.WARNING:
            print(f"nbdkit: python[vblk]: {msg}", file=sys.stderr, flush=True)
        else:
            nbdkit.debug(msg)


_log = logging.getLogger("vblk")
_log.addHandler(_NbdkitLogHandler())
_log.setLevel(logging.INFO)
_log.propagate = False


def _warn(msg):
    _log.warning("vblk: %s", msg)


def _fail(e):
    """Pass a vblk_core error to the client with its errno; nbdkit logs the message."""
    nbdkit.set_error(getattr(e, "errno", errno.EIO) or errno.EIO)
    # A fresh exception without the driver's frames keeps nbdkit's log to the message.
    raise RuntimeError(f"vblk: {e}") from None


def _config_error(e):
    # nbdkit prints any exception a callback raises as a Python traceback.  A configuration
    # mistake deserves one line naming the key and the fix; nothing has started yet (no
    # socket, no threads, no daemon), so leaving at once is safe.
    sys.stderr.write(f"nbdkit: python[vblk]: error: {e}\n")
    sys.stderr.flush()
    os._exit(1)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    try:
        cfg.set(key, value)
    except VblkError as e:
        _config_error(e)


def config_complete():
    # Everything that can be checked before nbdkit listens is checked here, including what a
    # socket= back-end offers (a probe connection): after nbdkit has bound its socket, a
    # failure would leave the socket file behind and print a Python traceback.
    try:
        cfg.complete()
        probe_device(cfg)
    except VblkError as e:
        _config_error(e)


def after_fork():
    # nbdkit forks (when it daemonizes) after get_ready: threads, the device session and the
    # managed daemon must all belong to the final process.
    global device, daemon, stats
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
    nbdkit.debug(f"vblk: {device.num_queues} of {device.device_queues} queues, "
                 f"queue size {device.queue_size}, capacity {device.capacity}; placement: "
                 f"{cfg.placement.describe()}")
    if cfg.stats:
        stats = StatsWriter(cfg.stats, device.stats, _warn)
        stats.start()


def _stop_daemon():
    global daemon
    if daemon is not None:
        daemon.stop()
        daemon = None


def cleanup():
    global device, stats
    if stats is not None:
        stats.stop()
        stats = None
    if device is not None:
        device.close()
        device = None
    _stop_daemon()


def open(readonly):
    if device is None:
        nbdkit.set_error(errno.EIO)
        raise RuntimeError("vblk: the device is not connected")
    return {"readonly": readonly}


def close(h):
    pass


def get_size(h):
    return device.capacity


def block_size(h):
    bs = device.block_size
    return (bs, max(device.optimal_io_size, 4096), MAX_REQUEST)


def is_rotational(h):
    return False


def can_multi_conn(h):
    return True  # one device session shared by every connection: a flush covers them all


def can_write(h):
    return not device.read_only


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return device.can_discard


def can_zero(h):
    return True


def can_fast_zero(h):
    return device.can_write_zeroes


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset, flags):
    try:
        device.pread(buf, offset)
    except VblkError as e:
        _fail(e)


def pwrite(h, buf, offset, flags):
    try:
        device.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except VblkError as e:
        _fail(e)


def flush(h, flags):
    try:
        device.flush()
    except VblkError as e:
        _fail(e)


def trim(h, count, offset, flags):
    try:
        device.discard(offset, count)
        if flags & nbdkit.FLAG_FUA:
            device.flush()
    except VblkError as e:
        _fail(e)


def zero(h, count, offset, flags):
    try:
        device.write_zeroes(offset, count, unmap=bool(flags & nbdkit.FLAG_MAY_TRIM),
                            fast=bool(flags & nbdkit.FLAG_FAST_ZERO))
        if flags & nbdkit.FLAG_FUA:
            device.flush()
    except VblkError as e:
        _fail(e)
