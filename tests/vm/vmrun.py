"""Boot the vblk test guest (see build_guest.py and init) against an NBD server's unix socket.

The guest reaches the server only through QEMU itself: user-mode networking with ``restrict=on``
(the guest can reach nothing outside QEMU) and a ``guestfwd`` rule that makes QEMU run
``bridge.py`` for every TCP connection the guest opens to GUEST_ADDR:GUEST_PORT; the bridge relays
it to the server's unix socket.  No TCP port is opened on the host.

Also usable by hand, against an NBD server already listening on a unix socket:
    python3 tests/vm/vmrun.py NBD_SOCKET [--conns 2] [--keep DIR]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BRIDGE = os.path.join(HERE, "bridge.py")
GUEST_ADDR = "10.0.2.100"  # inside QEMU's user network (10.0.2.0/24), served by guestfwd only
GUEST_PORT = 10809
RESULT_RE = re.compile(r"VBLK-VM-RESULT: (OK|FAIL)\b ?(.*)")

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


# ----------------------------------------------------------------------------- running QEMU
@dataclasses.dataclass
class GuestRun:
    ok: bool                 # the guest printed "VBLK-VM-RESULT: OK"
    result_line: str | None  # the whole result line, or None if none was printed
    details: str
    console: str             # everything the guest printed on its serial console
    returncode: int | None   # QEMU's exit status (None: killed on timeout)
    timed_out: bool
    seconds: float
    connections: list[dict]  # one per guest TCP connection the bridge carried

    def explain(self) -> str:
        tail = "\n".join(self.console.splitlines()[-40:])
        return (f"result={self.result_line!r} qemu_rc={self.returncode} timed_out={self.timed_out} "
                f"after {self.seconds:.1f}s; bridge connections={self.connections}\n"
                f"--- last console lines ---\n{tail}")


def _opt(value: str) -> str:
    """Escape a value for a QEMU comma-separated option list."""
    return value.replace(",", ",,")


def qemu_command(meta: dict, nbd_socket: str, bridge_log: str, seed: str, files,
                 conns: int = 2, memory_mb: int = 256) -> list[str]:
    for p in (nbd_socket, bridge_log, BRIDGE, sys.executable):
        if " " in p:
            raise ValueError(f"path with a space cannot go into guestfwd's cmd: {p!r}")
    # -I -S: isolated, no site import: starts fast and ignores the environment.
    bridge_cmd = f"{sys.executable} -I -S {BRIDGE} {nbd_socket} {bridge_log}"
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
        "-kernel", _opt(meta["vmlinux"]),
        "-initrd", _opt(meta["initramfs"]),
        "-append", append,
        "-netdev", "user,id=n0,restrict=on,"
                   f"guestfwd=tcp:{GUEST_ADDR}:{GUEST_PORT}-cmd:{_opt(bridge_cmd)}",
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
    """Boot the guest once; always returns (QEMU is killed by PID on timeout or error)."""
    seed = seed or secrets.token_hex(4)
    console_path = os.path.join(workdir, "console.log")
    bridge_log = os.path.join(workdir, "bridge.log")
    cmd = qemu_command(meta, nbd_socket, bridge_log, seed, files, conns)
    t0 = time.monotonic()
    timed_out = False
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # QEMU, by PID
                proc.wait()
    seconds = time.monotonic() - t0
    with open(console_path, "rb") as f:
        text = f.read().decode("utf-8", "replace").replace("\r\n", "\n")
    if echo:
        sys.stderr.write(text)
    line, ok, details = None, False, ""
    for m in RESULT_RE.finditer(text):
        line, ok, details = m.group(0).strip(), m.group(1) == "OK", m.group(2).strip()
    return GuestRun(ok=ok, result_line=line, details=details, console=text,
                    returncode=None if timed_out else proc.returncode, timed_out=timed_out,
                    seconds=seconds, connections=read_bridge_log(bridge_log))


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
