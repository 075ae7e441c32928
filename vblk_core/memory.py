"""Shared memory: one memfd mapping registered with the device, and a bounce-buffer pool in it.

NBD's buffers are not in memory the device can see, so data goes through bounce buffers that live
in the same memfd as the rings.  The transport decides the device address of the region
(vhost-user uses our user address; an IOMMU-backed transport picks its own IOVA).

The memfd is sealed against shrinking and growing before anyone else can see it.  The device is
untrusted and, on two transports, holds the file itself: a vhost-user back-end receives the fd
with SET_MEM_TABLE, and a VDUSE daemon behind vhost-vdpa gets the same file from the kernel
(VDUSE_IOTLB_GET_FD on the mapping we register).  Unsealed, it could ftruncate() the file and
the next access to a page past the new end would raise SIGBUS and kill this process, with every
client and every request in flight; sealed, ftruncate() fails with EPERM in the device and
nothing happens to us.  (QEMU seals its memfd guest memory the same way.)  Writes stay allowed:
the device writes data and used rings into the region.  vfio-pci hands no fd out (the IOMMU
pins the pages), but the region is sealed all the same.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import time

from .errors import ConfigError, RequestError

PAGE_SIZE = mmap.PAGESIZE


#: The seals every shared region carries: its size is fixed, and no one may add or lift seals
#: (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE would stop the device from completing anything).
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedRegion:
    """An anonymous memfd of ``size`` bytes (rounded up to pages), sealed at that size
    (``SEALS``), mapped MAP_SHARED into this process.

    ``fd`` is what the device maps; ``view`` a writable memoryview of the whole mapping;
    ``base_addr`` its address in this process (used as the guest address too).
    """

    def __init__(self, size: int, name: str = "vblk") -> None:
        """Raises ConfigError for a size below 1, OSError if the memfd cannot be created,
        sized, sealed or mapped (e.g. ENOMEM)."""
        if size <= 0:
            raise ConfigError(f"shared region size must be positive, not {size}")
        self.size = (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            # Sealed while the fd is ours alone: no transport has seen it yet.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SEALS)
            self._mmap = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        anchor = ctypes.c_char.from_buffer(self._mmap)
        self.base_addr = ctypes.addressof(anchor)
        del anchor  # keep no export alive: close() must be able to unmap
        self.view = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap and close.  Safe to call twice."""
        if self.fd < 0:
            return
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a slice is still referenced somewhere; the mapping dies with the process
        os.close(self.fd)
        self.fd = -1


class BouncePool:
    """Fixed-size buffers carved from a SharedRegion, handed out LIFO so hot pages stay hot.

    ``acquire`` blocks (without the GIL) until a buffer is free or the timeout passes.
    """

    def __init__(self, region: SharedRegion, offset: int, count: int, buffer_size: int) -> None:
        if count < 1 or buffer_size < 512 or buffer_size % 512:
            raise ConfigError("bounce pool needs >= 1 buffer of a multiple of 512 bytes")
        if offset + count * buffer_size > region.size:
            raise ConfigError("bounce pool does not fit in the shared region")
        self.region = region
        self.device_base = region.base_addr
        self.offset = offset
        self.count = count
        self.buffer_size = buffer_size
        self._free = list(range(count - 1, -1, -1))
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0
        self.high_water = 0

    def offset_of(self, index: int) -> int:
        """Offset in the region of buffer ``index``."""
        return self.offset + index * self.buffer_size

    def addr_of(self, index: int) -> int:
        """Device address of buffer ``index``."""
        return self.device_base + self.offset + index * self.buffer_size

    def set_device_base(self, base: int) -> None:
        """The device address of the region's first byte (the transport chooses it)."""
        self.device_base = base

    @property
    def in_use(self) -> int:
        return self.count - len(self._free)

    def try_acquire(self) -> int | None:
        """A free buffer index, or None at once if there is none."""
        try:
            index = self._free.pop()  # atomic under the GIL: no lock on the fast path
        except IndexError:
            return None
        used = self.count - len(self._free)
        if used > self.high_water:
            self.high_water = used
        return index

    def acquire(self, timeout: float) -> int:
        """A free buffer index.  Raises RequestError(EIO) if none frees up within ``timeout``."""
        index = self.try_acquire()
        if index is not None:
            return index
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    index = self.try_acquire()
                    if index is not None:
                        return index
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestError(f"no bounce buffer became free within {timeout:g}s")
                    # Short waits: a release between our check and the wait is not missed
                    # for long even though release() checks _waiting without the lock.
                    self._cond.wait(min(remaining, 0.01))
            finally:
                self._waiting -= 1

    def release(self, index: int) -> None:
        self._free.append(index)  # atomic under the GIL
        if self._waiting:
            with self._cond:
                self._cond.notify()
