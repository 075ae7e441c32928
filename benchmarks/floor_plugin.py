"""The Python floor: the least a Python nbdkit plugin can do to serve an image.

    nbdkit -U SOCK python benchmarks/floor_plugin.py file=IMAGE [threads=serialized|parallel]

Each NBD read is one os.preadv into nbdkit's buffer, each write one os.pwrite (looped on a short
write), on one file descriptor shared by all connections.  No caching, no locking, no metadata.
Whatever a Python plugin does on top of this (vblk's virtio-blk driver) is measured against it.

Keys:
  file=PATH                       the image (required)
  threads=serialized|parallel     nbdkit thread model (default serialized):
                                    serialized -> THREAD_MODEL_SERIALIZE_ALL_REQUESTS
                                    parallel   -> THREAD_MODEL_PARALLEL
  readonly=true|false             refuse writes (default false)
"""

import os

import nbdkit

API_VERSION = 2

_MODELS = {
    "serialized": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_all_requests": nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS,
    "serialize_requests": nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS,
    "parallel": nbdkit.THREAD_MODEL_PARALLEL,
}

_path = None
_model = "serialized"
_readonly = False
_fd = -1
_size = 0


def config(key, value):
    global _path, _model, _readonly
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "threads":
        if value not in _MODELS:
            raise ValueError("threads must be one of: %s" % ", ".join(sorted(_MODELS)))
        _model = value
    elif key == "readonly":
        _readonly = value.lower() in ("1", "true", "yes", "on")
    else:
        raise ValueError("unknown key %r (known: file, threads, readonly)" % key)


def config_complete():
    global _fd, _size
    if _path is None:
        raise ValueError("file=PATH is required")
    _fd = os.open(_path, os.O_RDONLY if _readonly else os.O_RDWR)
    _size = os.fstat(_fd).st_size


def thread_model():
    return _MODELS[_model]


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_write(h):
    return not _readonly


def can_flush(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    n = os.preadv(_fd, [buf], offset)
    if n != len(buf):
        raise OSError("short read: %d of %d bytes at %d" % (n, len(buf), offset))


def pwrite(h, buf, offset, flags):
    n = os.pwrite(_fd, buf, offset)
    if n != len(buf):  # rare: finish a short write
        view = memoryview(buf)[n:]
        offset += n
        while view:
            n = os.pwrite(_fd, view, offset)
            if n <= 0:
                raise OSError("pwrite wrote nothing at %d" % offset)
            view = view[n:]
            offset += n
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(_fd)


def flush(h, flags):
    os.fdatasync(_fd)
