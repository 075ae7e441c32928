"""The Linux kernel's NBD client against vblk, for real, in a QEMU guest.

image file <- qemu-storage-daemon (vhost-user-blk) <- nbdkit + plugin/plugin.py (unix socket)
<- QEMU guestfwd bridge <- guest kernel nbd.ko (nbd-client -C 2) <- mkfs.ext4, files, read back.

Afterwards, with every server stopped, the host checks the image itself: ``e2fsck -fn`` and every
file's bytes (``debugfs dump``) against the expected content.  The guest is built by
tests/vm/build_guest.py (cached in tests/vm/.cache/); see tests/vm/vmrun.py for the QEMU side.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VM_DIR = REPO / "tests" / "vm"
PLUGIN = REPO / "plugin" / "plugin.py"
IMAGE_SIZE = 256 << 20
GUEST_TIMEOUT = 150  # seconds; a run takes 15-45 s here, depending on the load
NBD_CONNECTIONS = 2  # nbd-client -C


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"vblk_vm_{name}", VM_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


build_guest = _load("build_guest")
vmrun = _load("vmrun")


def nbd_server_command(vhost_socket: Path, nbd_socket: Path, pidfile: Path) -> list[str]:
    """The NBD server under test (vblk's nbdkit plugin), listening on nbd_socket."""
    return ["nbdkit", "-f", "-U", str(nbd_socket), "-P", str(pidfile),
            "python", str(PLUGIN), f"socket={vhost_socket}"]


class Processes:
    """Processes started by the test, stopped by PID (SIGTERM, then SIGKILL) at teardown."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.logdir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def logs(self) -> str:
        return "\n".join(f"--- {name} (pid {p.pid}, rc {p.poll()}) ---\n{self.log_tail(name)}"
                         for name, p in self.procs)

    def stop(self, proc: subprocess.Popen, timeout: float = 15) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def processes(tmp_path):
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def sockdir():
    # unix socket paths must stay short (108 bytes) and must not contain spaces or commas
    d = tempfile.mkdtemp(prefix="vblk-vm-")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def is_listening(path: Path) -> bool:
    """Whether a unix socket at path is listening (found in /proc/net/unix with __SO_ACCEPTCON);
    checked without connecting, since the vhost-user daemon serves only one front-end."""
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_for(path: Path, proc: subprocess.Popen, what: str, procs: Processes,
             timeout: float = 20, listening: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while not (is_listening(path) if listening else path.exists()):
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode} before creating {path}\n"
                        f"{procs.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not create {path} within {timeout}s\n{procs.logs()}")
        time.sleep(0.05)


def require_tools() -> None:
    missing = [t for t in ("qemu-system-x86_64", "qemu-storage-daemon", "nbdkit", "e2fsck",
                           "debugfs", "dpkg", "apt-get", "modinfo", "ldd")
               if shutil.which(t) is None]
    for f in ("/bin/busybox", "/usr/sbin/nbd-client", "/usr/sbin/mke2fs"):
        if not os.path.exists(f):
            missing.append(f)
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} is missing: nothing to test")
    if missing:
        pytest.fail(f"the kernel NBD client test needs {', '.join(missing)}: "
                    "run scripts/setup --vm (packages qemu-system-x86, qemu-storage-daemon's "
                    "qemu-system-common on Debian 12 / qemu-utils on Debian 13, nbdkit, "
                    "busybox-static, nbd-client, kmod, e2fsprogs, zstd)")


def first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    step = 1 << 16
    for off in range(0, n, step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, n)):
                if a[i] != b[i]:
                    return i
    return n


def check_image(image: Path, seed: str, meta: dict, workdir: Path) -> list[str]:
    """Check the image on the host, with no server running: e2fsck -fn must pass and every file
    must hold exactly the bytes the guest was told to write.  Returns the problems found."""
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    if fsck.returncode != 0:
        return [f"e2fsck -fn failed ({fsck.returncode}):\n{fsck.stdout}{fsck.stderr}"]
    expected = {name: vmrun.file_content(seed, name, size) for name, size in vmrun.DEFAULT_FILES}
    with open("/bin/busybox", "rb") as f:
        expected["busybox.bin"] = f.read()  # the guest copied its own /bin/busybox
    if hashlib.sha256(expected["busybox.bin"]).hexdigest() != meta["busybox_sha256"]:
        return ["/bin/busybox changed since the guest was built: "
                "rebuild with python3 tests/vm/build_guest.py --force"]
    workdir.mkdir(parents=True, exist_ok=True)
    outs = {name: workdir / f"f{i}" for i, name in enumerate(expected)}
    cmds = workdir / "debugfs.cmds"
    cmds.write_text("".join(f"dump /{name} {outs[name]}\n" for name in expected))
    dbg = subprocess.run(["debugfs", "-f", str(cmds), str(image)], capture_output=True, text=True)
    if dbg.returncode != 0:
        return [f"debugfs failed ({dbg.returncode}):\n{dbg.stdout}{dbg.stderr}"]
    problems = []
    for name, want in expected.items():
        if not outs[name].exists():
            problems.append(f"debugfs could not dump /{name}: {dbg.stderr.strip()}")
            continue
        got = outs[name].read_bytes()
        if got != want:
            off = first_difference(got, want)
            problems.append(f"/{name}: {len(got)} bytes in the image, {len(want)} expected; first "
                            f"difference at byte {off}: got {got[off:off + 40]!r}, "
                            f"want {want[off:off + 40]!r} (seed {seed})")
    return problems


@pytest.mark.slow
def test_kernel_nbd_client_ext4(tmp_path, sockdir, processes, capsys):
    require_tools()
    try:
        with capsys.disabled():  # a first build downloads the kernel: show its progress live
            meta = build_guest.ensure_guest()
    except build_guest.BuildError as e:
        pytest.fail(f"could not build the test guest: {e}")

    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)  # sparse
    vhost_sock = sockdir / "vhost.sock"
    nbd_sock = sockdir / "nbd.sock"
    pidfile = sockdir / "nbdkit.pid"

    daemon = processes.start("qemu-storage-daemon", [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", "driver=raw,node-name=raw0,file=file0",
        "--export", "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                    f"addr.path={vhost_sock},writable=on,num-queues=2",
    ])
    wait_for(vhost_sock, daemon, "qemu-storage-daemon", processes, listening=True)
    nbdkit = processes.start("nbdkit", nbd_server_command(vhost_sock, nbd_sock, pidfile))
    wait_for(pidfile, nbdkit, "nbdkit", processes)  # nbdkit writes it once it listens

    seed = os.urandom(4).hex()
    run = vmrun.run_guest(meta, str(nbd_sock), str(tmp_path), seed=seed,
                          conns=NBD_CONNECTIONS, timeout=GUEST_TIMEOUT)
    print(f"guest: {run.result_line} in {run.seconds:.1f}s; connections: {run.connections}")

    # Stop the servers (by PID) before looking at the image.
    servers_alive = {"nbdkit": nbdkit.poll() is None, "qemu-storage-daemon": daemon.poll() is None}
    nbdkit_rc = processes.stop(nbdkit)
    processes.stop(daemon)
    diag = f"{run.explain()}\n{processes.logs()}"
    assert run.ok, f"the guest did not report success\n{diag}"
    assert all(servers_alive.values()), f"a server died during the run: {servers_alive}\n{diag}"
    assert run.connections and all(c["closed"] for c in run.connections), diag
    assert sum(c.get("up", 0) for c in run.connections) > 16 << 20, diag
    assert nbdkit_rc == 0, f"nbdkit exited with {nbdkit_rc} after SIGTERM\n{diag}"

    if "multiconn_fallback" in run.details:
        warnings.warn("the NBD server does not advertise multi-conn: the kernel client fell back "
                      f"from -C {NBD_CONNECTIONS} to one connection", stacklevel=1)

    problems = check_image(image, seed, meta, tmp_path / "check")
    assert not problems, "\n".join(problems)
