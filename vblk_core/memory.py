"""Shared memory: one memfd mapping registered with the device.

NBD's buffers are not in memory the device can see, so data goes through bounce buffers that live
in the same memfd as the rings (each request slot owns one: see slot.py and datapath.py).  The
transport decides the device address of the region (vhost-user uses our user address; an
IOMMU-backed transport picks its own IOVA).

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

from .errors import ConfigError

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
