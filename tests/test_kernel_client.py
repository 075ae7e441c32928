"""The Linux kernel's NBD client against vblk, for real, in a QEMU guest.

image file <- qemu-storage-daemon (vhost-user-blk) <- nbdkit + plugin/plugin.py (unix socket)
<- QEMU guestfwd bridge <- guest kernel nbd.ko (nbd-client -C 2) <- mkfs.ext4, files, read back.
Both connections must carry data (a fall-back to one connection is a failure).

Afterwards, with every server stopped, the host checks the image itself: ``e2fsck -fn`` and every
file's bytes (``debugfs dump``) against the expected content.  The guest is built by
tests/vm/build_guest.py (cached in tests/vm/.cache/); see tests/vm/vmrun.py for the QEMU side.
(pyproject.toml puts tests/vm on the tests' path.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import build_guest
import pytest
import vmrun

from conftest import need
from vblk_plugin.qsd import QSD
from vblk_tools.needs import QSD_PACKAGE
from vblk_tools.patterns import first_difference

IMAGE_SIZE = 256 << 20
GUEST_TIMEOUT = 150  # seconds; a run takes 15-45 s here, depending on the load
NBD_CONNECTIONS = 2  # nbd-client -C
#: what the test runs on the host besides building the guest, by package
RUN_NEEDS = {"qemu-system-x86_64": "qemu-system-x86", QSD: QSD_PACKAGE, "nbdkit": "nbdkit",
             "e2fsck": "e2fsprogs", "debugfs": "e2fsprogs"}


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
            off = first_difference(got, want) or 0   # None only if equal, and they differ
            problems.append(f"/{name}: {len(got)} bytes in the image, {len(want)} expected; first "
                            f"difference at byte {off}: got {got[off:off + 40]!r}, "
                            f"want {want[off:off + 40]!r} (seed {seed})")
    return problems


@pytest.mark.slow
def test_kernel_nbd_client_ext4(tmp_path, capsys, qsd_factory, nbdkit_factory):
    need({**build_guest.BUILD_NEEDS, **build_guest.CLIENT_NEEDS, **RUN_NEEDS},
         "the kernel NBD client test", "scripts/setup --vm")
    try:
        with capsys.disabled():  # a first build downloads the kernel: show its progress live
            meta = build_guest.ensure_guest()
    except build_guest.BuildError as e:
        pytest.fail(f"could not build the test guest: {e}")

    daemon = qsd_factory(size=IMAGE_SIZE, num_queues=2)     # a sparse image
    image = daemon.image
    nbdkit = nbdkit_factory({"socket": daemon.socket})
    try:
        seed = os.urandom(4).hex()
        run = vmrun.run_guest(meta, nbdkit.socket, str(tmp_path), seed=seed,
                              conns=NBD_CONNECTIONS, timeout=GUEST_TIMEOUT)
        print(f"guest: {run.result_line} in {run.seconds:.1f}s; connections: {run.connections}")
        servers_alive = {"nbdkit": nbdkit.running, "qemu-storage-daemon": daemon.running}
    finally:
        # Stop the servers (by PID) before looking at the image.
        stopped = nbdkit.stop()
        daemon.stop()
    diag = f"{run.explain()}\n--- nbdkit ---\n{nbdkit.log_text()}\n--- qsd ---\n{daemon.log_text()}"
    assert run.ok, f"the guest did not report success\n{diag}"
    assert all(servers_alive.values()), f"a server died during the run: {servers_alive}\n{diag}"
    assert "multiconn_fallback" not in run.details, (
        f"the kernel client fell back from -C {NBD_CONNECTIONS} to one connection: the export "
        f"must advertise multi-conn\n{diag}")
    carrying = [c for c in run.connections if c.get("up", 0) >= 1 << 20]
    assert len(carrying) >= NBD_CONNECTIONS, (
        f"{len(carrying)} of the guest's connections carried data, want {NBD_CONNECTIONS}\n{diag}")
    assert all(c["closed"] for c in run.connections), diag
    assert sum(c.get("up", 0) for c in run.connections) > 16 << 20, diag
    assert stopped.status == 0, f"nbdkit exited with {stopped.status} after SIGTERM\n{diag}"

    problems = check_image(image, seed, meta, tmp_path / "check")
    assert not problems, "\n".join(problems)
