"""What a hostile device tries on the shared-memory file it was handed (a vhost-user back-end
gets it with SET_MEM_TABLE, a VDUSE daemon from VDUSE_IOTLB_GET_FD): change its size, or add a
seal that would stop the driver.  Used by the fakes and the vhost-user proxy of the tests.

vblk seals the file (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), so each attempt must fail with
EPERM.  Were the file not sealed, a shrink would make the driver's next access past the new end
raise SIGBUS: an attempt that succeeds is undone at once (the size put back), so a test fails on
its assertion, not by the death of whoever maps the file.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
from collections.abc import Callable

#: linux/fcntl.h; Python's fcntl module lacks it.
F_SEAL_FUTURE_WRITE = 0x10
#: What each attempt got from the kernel when the file is sealed as vblk seals it.
REFUSED = dict.fromkeys(("shrink", "shrink-one-page", "grow", "fallocate-grow",
                         "seal-future-write"), errno.EPERM)


def _errno_of(attempt: Callable[[], object]) -> int:
    try:
        attempt()
    except OSError as e:
        return e.errno or -1
    return 0


def attack(fd: int) -> dict[str, int]:
    """Try to shrink the file to nothing and by one page, grow it by ftruncate() and by
    fallocate(), and add F_SEAL_FUTURE_WRITE.  Returns each attempt's errno (0: it worked;
    REFUSED is what a sealed file gives: EPERM everywhere)."""
    size = os.fstat(fd).st_size
    results = {}
    for name, new_size in (("shrink", 0), ("shrink-one-page", size - mmap.PAGESIZE),
                           ("grow", size + mmap.PAGESIZE)):
        results[name] = _errno_of(functools.partial(os.ftruncate, fd, new_size))
        if results[name] == 0:
            os.ftruncate(fd, size)
    results["fallocate-grow"] = _errno_of(lambda: os.posix_fallocate(fd, size, mmap.PAGESIZE))
    if results["fallocate-grow"] == 0:
        os.ftruncate(fd, size)
    results["seal-future-write"] = _errno_of(
        lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE))
    return results


def seals(fd: int) -> int:
    """The seals on the file (F_GET_SEALS)."""
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
