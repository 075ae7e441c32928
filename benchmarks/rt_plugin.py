"""The round-trip ceiling: a Python plugin whose every request is one round trip to a tiny C
process (benchmarks/rt_device.c) through shared memory and two eventfds.

    nbdkit -U SOCK python benchmarks/rt_plugin.py file=IMAGE device=PATH/rt_device

No virtio and no qemu: what is left is what any out-of-process design pays per request in a
Python plugin (fill a slot, kick, sleep until the device's call, copy).  vblk is measured
against it (scripts/bench servers `rt`, `rt-pinned`).  Keys: file=IMAGE (required),
device=BINARY (required, scripts/bench compiles it), device-cpus=0,1 (pin the device),
readonly=true|false.
"""

import mmap
import os
import struct
import subprocess

import nbdkit

API_VERSION = 2

NSLOTS = 64                 # as rt_device.c
BUF_SIZE = 1 << 20
SLOTS_BYTES = 4096
SLOT = struct.Struct("=IIQIi")   # state, op, offset, length, result (24 bytes)
SLOT_STRIDE = 24
SHM_SIZE = SLOTS_BYTES + NSLOTS * BUF_SIZE

_path = None
_binary = None
_readonly = False
_device_cpus = None
_size = 0
_proc = None
_shm = None
_view = None
_kick = -1
_calls = []
_free = []


def config(key, value):
    global _path, _binary, _readonly, _device_cpus
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "device":
        _binary = os.path.abspath(value)
    elif key == "device-cpus":
        _device_cpus = {int(c) for c in value.split(",")}
    elif key == "readonly":
        _readonly = value.lower() in ("1", "true", "yes", "on")
    else:
        raise ValueError(f"unknown key {key!r} (known: file, device, device-cpus, readonly)")


def config_complete():
    global _size
    if _path is None or _binary is None:
        raise ValueError("file=IMAGE and device=BINARY are required")
    _size = os.stat(_path).st_size


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def after_fork():
    global _proc, _shm, _view, _kick, _calls, _free
    shm_fd = os.memfd_create("rt", 0)
    os.ftruncate(shm_fd, SHM_SIZE)
    _shm = mmap.mmap(shm_fd, SHM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    _view = memoryview(_shm)
    img_fd = os.open(_path, os.O_RDONLY if _readonly else os.O_RDWR)
    _kick = os.eventfd(0)
    _calls = [os.eventfd(0) for _ in range(NSLOTS)]
    _free = list(range(NSLOTS))
    fds = [shm_fd, img_fd, _kick] + _calls
    _proc = subprocess.Popen([_binary] + [str(fd) for fd in fds], pass_fds=fds,
                             preexec_fn=_place_device)
    os.close(shm_fd)
    os.close(img_fd)


def _place_device():
    if _device_cpus:
        os.sched_setaffinity(0, _device_cpus)


def cleanup():
    if _proc is not None:
        _proc.terminate()
        _proc.wait()


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_write(h):
    return not _readonly


def can_multi_conn(h):
    return True


def _round_trip(i, op, offset, length):
    """Submit slot ``i`` and sleep until the device answers it."""
    SLOT.pack_into(_view, i * SLOT_STRIDE, 0, op, offset, length, 0)
    _view[i * SLOT_STRIDE] = 1               # state = submitted, last (x86 orders stores)
    os.eventfd_write(_kick, 1)
    os.eventfd_read(_calls[i])               # sleeps without the GIL
    if _view[i * SLOT_STRIDE] != 2 or SLOT.unpack_from(_view, i * SLOT_STRIDE)[4]:
        raise OSError("rt_device: request failed")


def pread(h, buf, offset, flags):
    i = _free.pop()          # atomic under the GIL; nbdkit never has more than 64 in flight
    try:
        n = len(buf)
        _round_trip(i, 0, offset, n)
        base = SLOTS_BYTES + i * BUF_SIZE
        buf[:] = _view[base:base + n]
    finally:
        _free.append(i)


def pwrite(h, buf, offset, flags):
    i = _free.pop()
    try:
        n = len(buf)
        base = SLOTS_BYTES + i * BUF_SIZE
        _view[base:base + n] = buf
        _round_trip(i, 1, offset, n)
    finally:
        _free.append(i)


def flush(h, flags):
    i = _free.pop()
    try:
        _round_trip(i, 2, 0, 0)
    finally:
        _free.append(i)
