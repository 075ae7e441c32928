"""Boot a test guest under QEMU and read what it reports: ``boot()`` and ``GuestRun``, for both
guests (build_guest.py's kernel-client guest here, transport_guest.py's).  A guest's init prints
one result line on its serial console, ``VBLK-GUEST-RESULT: OK <details>`` or ``... FAIL <why>``,
and powers off; QEMU is killed (by PID) if it has not exited within the timeout.

The kernel-client guest (build_guest.py, tests/vm/init) reaches an NBD server only through QEMU
itself: user-mode networking with ``restrict=on`` (the guest can reach nothing outside QEMU) and
a ``guestfwd`` rule that makes QEMU run ``bridge.py`` for every TCP connection the guest opens
to GUEST_ADDR:GUEST_PORT; the bridge relays it to the server's unix socket.  No TCP port is
opened on the host.

Also usable by hand, against an NBD server already listening on a unix socket:
    python3 tests/vm/vmrun.py NBD_SOCKET [--conns 2] [--keep DIR]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
BRIDGE = os.path.join(HERE, "bridge.py")
GUEST_ADDR = "10.0.2.100"  # inside QEMU's user network (10.0.2.0/24), served by guestfwd only
GUEST_PORT = 10809
RESULT_RE = re.compile(r"VBLK-GUEST-RESULT: (OK|FAIL)\b ?(.*)")
INIT_STARTED = re.compile(r"vblk-guest \[[0-9.]+\] init started")


# ----------------------------------------------------------------------------- running QEMU

@dataclasses.dataclass
class GuestRun:
    ok: bool                    # the guest printed "VBLK-GUEST-RESULT: OK"
    result_line: str | None     # the whole result line, or None if none was printed
    details: str
    console: str                # everything the guest printed on its serial console
    returncode: int | None      # QEMU's exit status (None: killed on timeout)
    timed_out: bool
    seconds: float              # QEMU start to exit
    boot_seconds: float | None  # QEMU start to the init's "init started" line
    connections: list[dict] = dataclasses.field(default_factory=list)  # the bridge's, if any

    def explain(self, lines: int = 60) -> str:
        tail = "\n".join(self.console.splitlines()[-lines:])
        bridge = f"; bridge connections={self.connections}" if self.connections else ""
        return (f"result={self.result_line!r} qemu_rc={self.returncode} "
                f"timed_out={self.timed_out} after {self.seconds:.1f}s{bridge}\n"
                f"--- last console lines ---\n{tail}")


def qemu_opt(value: str) -> str:
    """Escape a value for a QEMU comma-separated option list."""
    return value.replace(",", ",,")


def boot(cmd: Sequence[str], *, timeout: float,
         progress: Callable[[str], None] | None = None) -> GuestRun:
    """Run QEMU (``cmd``) until it exits; every console line goes to ``progress`` as it
    arrives.  QEMU is killed (by PID) on timeout or interruption; always returns."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    boot_seconds: float | None = None
    timed_out = eof = False
    chunks: list[bytes] = []
    partial = b""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            data = os.read(fd, 65536)
            if not data:
                eof = True   # QEMU closed the console: it is exiting
                break
            chunks.append(data)
            partial += data
            *lines, partial = partial.split(b"\n")
            for raw in lines:
                line = raw.decode("utf-8", "replace").rstrip("\r")
                if boot_seconds is None and INIT_STARTED.search(line):
                    boot_seconds = time.monotonic() - t0
                if progress:
                    progress(f"[{time.monotonic() - t0:5.1f}s] {line}")
    finally:
        if proc.poll() is None and not eof:   # timed out, or interrupted
            proc.send_signal(signal.SIGKILL)   # QEMU, by PID
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    result: str | None = None
    ok, details = False, ""
    for m in RESULT_RE.finditer(text):
        result, ok, details = m.group(0).strip(), m.group(1) == "OK", m.group(2).strip()
    return GuestRun(ok=ok, result_line=result, details=details, console=text,
                    returncode=None if timed_out else proc.returncode, timed_out=timed_out,
                    seconds=time.monotonic() - t0, boot_seconds=boot_seconds)


# ----------------------------------------------------------------------------- content recipe
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/"
_PAD = ALPHABET * 9

# (path inside the file system, size in bytes): big ones, odd sizes, a tiny one, a subdirectory.
DEFAULT_FILES = [
    ("big16.dat", 16 << 20),
    ("big8.dat", 8 << 20),
    ("medium.dat", 1 << 20 | 4097),
    ("dir/small.txt", 4097),
    ("dir/sub/tiny.txt", 1),
    ("odd.txt", 70001),
]


def file_content(seed: str, name: str, size: int) -> bytes:
    """The bytes the guest's init writes for (seed, name, size): 512-byte records, each naming
    the seed, the file and its own index, so a misplaced or stale sector shows."""
    out = bytearray()
    i = 0
    while len(out) < size:
        head = f"{seed} {name} {i:08d} "
        off = (i * 7) % 64
        out += (head + _PAD[off:off + 511 - len(head)] + "\n").encode()
        i += 1
    return bytes(out[:size])


def files_param(seed: str, files) -> str:
    parts = []
    for name, size in files:
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", name) or name.startswith("/"):
            raise ValueError(f"bad file name for the guest: {name!r}")
        digest = hashlib.sha256(file_content(seed, name, size)).hexdigest()
        parts.append(f"{name}:{size}:{digest}")
    return ",".join(parts)


# ----------------------------------------------------------------------------- the kernel client

def qemu_command(meta: dict, nbd_socket: str, bridge_log: str, seed: str, files,
                 conns: int = 2, memory_mb: int = 256) -> list[str]:
    # QEMU hands guestfwd's cmd to a shell parser: every path is quoted (a checkout, a socket
    # or a log may have a space in its path).  -I -S: isolated, no site import: starts fast and
    # ignores the environment.
    bridge_cmd = shlex.join([sys.executable, "-I", "-S", BRIDGE, nbd_socket, bridge_log])
    append = " ".join([
        "console=ttyS0", "panic=-1", "quiet", "loglevel=4", "rdinit=/init",
        "i8042.noaux=1", "i8042.nokbd=1",
        f"vblk.host={GUEST_ADDR}", f"vblk.port={GUEST_PORT}", f"vblk.conns={conns}",
        f"vblk.seed={seed}", f"vblk.files={files_param(seed, files)}",
    ])
    if len(append) > 2000:
        raise ValueError("kernel command line too long: fewer files")
    return [
        "qemu-system-x86_64",
        "-accel", "tcg",
        "-m", str(memory_mb),
        # Two vCPUs: the kernel maps its blk-mq queues (one per CPU) to the NBD connections, so
        # with -C 2 both connections carry I/O; with one vCPU everything used one connection.
        "-smp", "2",
        "-nodefaults", "-nographic", "-no-reboot",
        "-serial", "stdio", "-monitor", "none",
        "-kernel", qemu_opt(meta["vmlinux"]),
        "-initrd", qemu_opt(meta["initramfs"]),
        "-append", append,
        "-netdev", "user,id=n0,restrict=on,"
                   f"guestfwd=tcp:{GUEST_ADDR}:{GUEST_PORT}-cmd:{qemu_opt(bridge_cmd)}",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
    ]


def read_bridge_log(path: str) -> list[dict]:
    conns: dict[str, dict] = {}
    try:
        with open(path) as f:
            for line in f:
                words = line.split()
                if len(words) < 2:
                    continue
                c = conns.setdefault(words[1], {"pid": int(words[1]), "closed": False})
                if words[0] == "close":
                    c["closed"] = True
                    for w in words[2:]:
                        k, _, v = w.partition("=")
                        c[k] = int(v) if v.isdigit() else v
    except FileNotFoundError:
        pass
    return list(conns.values())


def run_guest(meta: dict, nbd_socket: str, workdir: str, *, seed: str | None = None,
              files=DEFAULT_FILES, conns: int = 2, timeout: float = 150.0,
              echo: bool = False) -> GuestRun:
    """Boot the kernel-client guest once against ``nbd_socket``; the console goes to
    workdir/console.log (and to stderr with ``echo``)."""
    seed = seed or secrets.token_hex(4)
    bridge_log = os.path.join(workdir, "bridge.log")
    cmd = qemu_command(meta, nbd_socket, bridge_log, seed, files, conns)
    with open(os.path.join(workdir, "console.log"), "w") as console:
        def keep(line: str) -> None:
            console.write(line + "\n")
            if echo:
                print(line, file=sys.stderr, flush=True)
        run = boot(cmd, timeout=timeout, progress=keep)
    run.connections = read_bridge_log(bridge_log)
    return run


def main() -> int:
    import argparse
    sys.path.insert(0, HERE)
    from build_guest import ensure_guest
    ap = argparse.ArgumentParser(description="boot the vblk test guest against an NBD unix socket")
    ap.add_argument("socket")
    ap.add_argument("--conns", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=150)
    ap.add_argument("--keep", help="directory for console.log and bridge.log (default: temporary)")
    args = ap.parse_args()
    meta = ensure_guest()
    workdir = args.keep or tempfile.mkdtemp(prefix="vblk-vm-")
    os.makedirs(workdir, exist_ok=True)
    r = run_guest(meta, os.path.abspath(args.socket), workdir, conns=args.conns,
                  timeout=args.timeout, echo=True)
    print(f"\n{r.result_line} ({r.seconds:.1f}s, qemu rc {r.returncode}, "
          f"connections {r.connections}); logs in {workdir}", file=sys.stderr)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
