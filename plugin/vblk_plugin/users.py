"""Who is using a device that will not take another session: for ``vblk info``'s message.

A vhost-user back-end serves one front-end at a time: qemu-storage-daemon's kernel accepts a
second connection and the daemon never reads it, so the first request times out (a
ControlTimeout: the bounded wait).  A vhost-vdpa device or a VFIO group that another process
holds refuses a second open with EBUSY.  Either way, the processes found here are named:
an nbdkit whose command line names the same device (``socket=``, ``vdpa=``, ``pci=``), and, for
device files, any process that holds the file open.  Reads /proc only; processes of other
users are skipped where /proc does not show them.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from vblk_core.errors import ConfigError, ControlTimeout, VblkError
from vblk_core.transports.vfio import normalize_pci_address

PROC = "/proc"


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str          # the program (nbdkit, qemu-system-x86_64, ...)

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def _pids(proc: str) -> list[int]:
    return sorted(int(p) for p in os.listdir(proc) if p.isdigit())


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _same_path(value: str, pid: int, path: str, proc: str) -> bool:
    """Whether ``value`` (an argument of process ``pid``, relative to its working directory)
    names the file ``path``."""
    if not os.path.isabs(value):
        try:
            value = os.path.join(os.readlink(f"{proc}/{pid}/cwd"), value)
        except OSError:
            return False
    return os.path.realpath(value) == os.path.realpath(path)


def nbdkit_users(key: str, value: str, proc: str = PROC) -> list[Holder]:
    """The nbdkit processes whose command line gives ``key=`` naming the same thing as
    ``value``: a PCI address for pci=, else a path (socket=, vdpa=, stats=)."""
    found = []
    for pid in _pids(proc):
        argv = [a.decode(errors="replace") for a in _read(f"{proc}/{pid}/cmdline").split(b"\0")]
        if not argv or os.path.basename(argv[0]) != "nbdkit":
            continue
        for arg in argv[1:]:
            k, sep, v = arg.partition("=")
            if not sep or k != key or not v:
                continue
            if key == "pci":
                try:
                    same = normalize_pci_address(v) == normalize_pci_address(value)
                except ConfigError:
                    same = False
            else:
                same = _same_path(v, pid, value, proc)
            if same:
                found.append(Holder(pid, "nbdkit"))
                break
    return found


def file_holders(path: str, proc: str = PROC) -> list[Holder]:
    """The processes holding the file ``path`` open (as /proc shows their descriptors)."""
    target = os.path.realpath(path)
    found = []
    for pid in _pids(proc):
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{proc}/{pid}/fd/{fd}") == target:
                    name = _read(f"{proc}/{pid}/comm").decode(errors="replace").strip()
                    found.append(Holder(pid, name or "?"))
                    break
            except OSError:
                continue
    return found


def device_file(key: str, value: str, sysfs: str = "/sys") -> str | None:
    """The file a session opens exclusively: the vhost-vdpa node, or the PCI function's VFIO
    group; None for a vhost-user socket (or a group that cannot be found)."""
    if key == "vdpa":
        return value
    if key == "pci":
        try:
            group = os.readlink(f"{sysfs}/bus/pci/devices/{value}/iommu_group")
        except OSError:
            return None
        return f"/dev/vfio/{os.path.basename(group)}"
    return None


def holders(key: str, value: str, proc: str = PROC) -> list[Holder]:
    """Everyone found using the device ``key=value``: nbdkits naming it, then the holders of
    its device file; each process once."""
    found = nbdkit_users(key, value, proc)
    path = device_file(key, value)
    if path is not None:
        found += [h for h in file_holders(path, proc) if h.pid not in {f.pid for f in found}]
    return found


def is_busy(e: VblkError) -> bool:
    """Whether ``e`` is what a device in use by someone else gives: a vhost-user back-end
    that did not answer in time, or a device file that refused another open (EBUSY)."""
    return isinstance(e, ControlTimeout) or e.errno == errno.EBUSY


def busy_message(key: str, value: str, e: VblkError, proc: str = PROC) -> str:
    """The one line for a device that will not take this session (``is_busy(e)``): who has
    it, and what to do."""
    users = holders(key, value, proc)
    one_at_a_time = ("; a vhost-user back-end serves one front-end at a time"
                     if key == "socket" else "")
    if users:
        advice = "stop it first"
        if any(h.name == "nbdkit" for h in users):
            advice += ", or ask it instead: nbdinfo on its export, `vblk stats` on its stats= file"
        who = ", ".join(str(h) for h in users)
        return f"{key}={value} is in use by {who}{one_at_a_time}: {advice}"
    if key == "socket":
        return (f"{key}={value}: {e}{one_at_a_time}: if none (a VM, another vblk) is "
                "attached, the back-end is hung")
    return f"{key}={value}: {e}"
