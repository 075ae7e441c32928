"""The one qemu-storage-daemon command line, and how to tell the daemon is ready.

``qsd_argv`` is pure: it builds the argv of a daemon serving one image (raw or qcow2) as a
vhost-user-blk export (or, for the benchmarks, an NBD export) on a unix socket.  The plugin's
image= mode, every test, scripts/soak and the benchmarks all start the daemon with it, so they
cannot drift apart again.  No vblk_core or nbdkit import here.

The block graph is always::

    file0 (driver=file) -> [filters...] -> fmt0 (driver=raw|qcow2) -> export exp0

with ``discard=unmap`` on every node of that chain: qemu's default ``discard=ignore`` on any one
node completes a DISCARD without effect, which silently turns every trim into a no-op.
``filters`` are stacked between the file node and the format node (e.g. a blklogwrites node
recording every write); ``extra_nodes`` are standalone nodes the filters refer to (e.g. the
file node of blklogwrites' log).
"""
from __future__ import annotations

import os
import socket as _socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

QSD = "qemu-storage-daemon"
FORMATS = ("raw", "qcow2")
AIO_MODES = ("threads", "io_uring", "native")
EXPORTS = ("vhost-user-blk", "nbd")
FILE_NODE = "file0"
FORMAT_NODE = "fmt0"
EXPORT_ID = "exp0"


@dataclass(frozen=True)
class Node:
    """One more ``--blockdev``: its driver, node name and other options (values are escaped
    for qemu's option syntax)."""
    driver: str
    name: str
    options: Mapping[str, str] = field(default_factory=dict)


def _escape(value: object) -> str:
    # qemu's key=value,... syntax: a comma inside a value is written as two.
    return str(value).replace(",", ",,")


def _opts(pairs: Mapping[str, object]) -> str:
    return ",".join(f"{k}={_escape(v)}" for k, v in pairs.items())


def qsd_argv(image: str | os.PathLike[str], socket: str | os.PathLike[str], *,
             fmt: str = "raw", aio: str = "threads", num_queues: int = 1,
             writable: bool = True, logical_block_size: int | None = None,
             export: str = "vhost-user-blk", filters: Sequence[Node] = (),
             extra_nodes: Sequence[Node] = (), program: str = QSD) -> list[str]:
    """The argv of a qemu-storage-daemon serving ``image`` on the unix socket ``socket``.

    ``fmt``: raw or qcow2.  ``aio``: threads, io_uring or native (native also opens the image
    with O_DIRECT, which it needs).  ``num_queues`` and ``logical_block_size`` apply to the
    vhost-user-blk export; ``export="nbd"`` serves the empty export name over NBD instead.
    Raises ValueError for a value qemu would refuse.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    if aio not in AIO_MODES:
        raise ValueError(f"aio {aio!r}: use one of {', '.join(AIO_MODES)}")
    if export not in EXPORTS:
        raise ValueError(f"export {export!r}: use one of {', '.join(EXPORTS)}")
    if num_queues < 1:
        raise ValueError(f"num_queues {num_queues}: use 1 or more")
    if logical_block_size is not None and (logical_block_size < 512
                                           or logical_block_size & (logical_block_size - 1)):
        raise ValueError(f"logical_block_size {logical_block_size}: use a power of two >= 512")
    argv = [program]
    for node in extra_nodes:
        argv += ["--blockdev", _opts({"driver": node.driver, "node-name": node.name,
                                      **node.options})]
    file_opts: dict[str, object] = {"driver": "file", "node-name": FILE_NODE,
                                    "filename": os.fspath(image), "discard": "unmap",
                                    "aio": aio}
    if aio == "native":
        file_opts["cache.direct"] = "on"
    argv += ["--blockdev", _opts(file_opts)]
    below = FILE_NODE
    for node in filters:
        argv += ["--blockdev", _opts({"driver": node.driver, "node-name": node.name,
                                      "file": below, "discard": "unmap", **node.options})]
        below = node.name
    argv += ["--blockdev", _opts({"driver": fmt, "node-name": FORMAT_NODE, "file": below,
                                  "discard": "unmap"})]
    on_off = "on" if writable else "off"
    path = os.fspath(socket)
    if export == "nbd":
        argv += ["--nbd-server", _opts({"addr.type": "unix", "addr.path": path}),
                 "--export", _opts({"type": "nbd", "id": EXPORT_ID, "node-name": FORMAT_NODE,
                                    "name": "", "writable": on_off})]
        return argv
    export_opts: dict[str, object] = {"type": "vhost-user-blk", "id": EXPORT_ID,
                                      "node-name": FORMAT_NODE, "addr.type": "unix",
                                      "addr.path": path, "writable": on_off,
                                      "num-queues": num_queues}
    if logical_block_size is not None:
        export_opts["logical-block-size"] = logical_block_size
    return argv + ["--export", _opts(export_opts)]


def debian_major(os_release: str = "", debian_version: str = "") -> int | None:
    """The Debian major release the texts of /etc/os-release and /etc/debian_version describe
    (testing or unstable count as 13; None if not Debian, or unknown)."""
    fields = {}
    for line in os_release.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    if fields.get("ID") == "debian" and fields.get("VERSION_ID", "").isdigit():
        return int(fields["VERSION_ID"])
    head = debian_version.strip().split(".")[0]
    if head.isdigit():
        return int(head)
    if "/" in head:                 # testing or unstable ("trixie/sid"): newer than 12
        return 13
    return None


def install_package(os_release: str = "", debian_version: str = "") -> str | None:
    """The Debian package holding qemu-storage-daemon on the distribution described by the
    texts of /etc/os-release and /etc/debian_version (None if not Debian, or unknown)."""
    major = debian_major(os_release, debian_version)
    if major is None:
        return None
    return "qemu-system-common" if major <= 12 else "qemu-utils"


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def host_debian() -> int | None:
    """This machine's Debian major release (None: not Debian)."""
    return debian_major(_read("/etc/os-release"), _read("/etc/debian_version"))


def daemon_package() -> str | None:
    """The Debian package holding qemu-storage-daemon on this machine (None: not Debian)."""
    return install_package(_read("/etc/os-release"), _read("/etc/debian_version"))


def missing_daemon_hint() -> str:
    """What to do when qemu-storage-daemon is not installed, for this machine's distribution."""
    pkg = daemon_package()
    if pkg is None:
        return ("install qemu-storage-daemon (part of QEMU: qemu-utils on Debian 13, "
                "qemu-system-common on Debian 12)")
    return f"apt-get install {pkg} (or run scripts/setup)"


def accepts_connection(path: str | os.PathLike[str], timeout: float = 1.0) -> bool:
    """True if something accepts a connection on the unix socket ``path`` (connect, close).

    A vhost-user back-end serves one front-end at a time and takes the next one after a
    disconnect, so this probe does not stand in anybody's way; it is how every vblk tool and
    the plugin's image= mode wait for a daemon to be ready."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
