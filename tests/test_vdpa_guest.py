"""vblk's vhost-vdpa transport against a real vDPA device, in a QEMU guest (TCG).

host image file -> QEMU virtio-blk-pci (discard=unmap) -> guest /dev/vdX -> qemu-storage-daemon
(host_device + raw, discard=unmap on both) -> VDUSE export vduse0 -> ``vdpa dev add`` -> vhost_vdpa
-> /dev/vhost-vdpa-N -> nbdkit + plugin/plugin.py ``vdpa=/dev/vhost-vdpa-N num-queues=2``
-> libnbd (4 connections x 2 threads), nbdcopy in and out, flush/trim/zero, FUA, the stats file;
before nbdkit, ``vblk info vdpa=/dev/vhost-vdpa-N`` (printed by this test).

The guest (tests/vm/transport_guest.py: a Debian 13 kernel, the host's root over 9p) runs
tests/vm/transport_checks.py, which checks everything it reads as it goes.  Then, with QEMU gone,
the host checks the image byte for byte against what was written, nbdcopy's copy of the whole
export (out.img on the share) likewise, and that the trims and zeroes left holes in the host
file.  The same boot also measures vblk_core alone on vhost-vdpa vs vhost-user (a vhost-user-blk
export of the same qemu-storage-daemon node): bench.md, printed by the test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import transport_checks
import transport_guest

from vblk_tools import needs
from vblk_tools.harness import make_image

QUEUES = 2
BENCH_SECONDS = 2.0
BENCH_ROUNDS = 2
GUEST_TIMEOUT = 240   # hard limit; a run takes 40-60 s here


def build_guest_or_fail(capsys, what: str):
    """The transport guest (built if need be), or fail naming what is missing."""
    missing = transport_guest.missing_tools()
    if missing:
        pytest.fail(needs.explain(f"the {what} guest test", missing, "scripts/setup --vm"),
                    pytrace=False)
    try:
        with capsys.disabled():   # a first build downloads the kernel: show it live
            return transport_guest.ensure_guest()
    except transport_guest.BuildError as e:
        pytest.fail(f"could not build the transport guest: {e}")


@pytest.mark.slow
def test_vhost_vdpa_in_guest(tmp_path, capsys):
    build_guest_or_fail(capsys, "vhost-vdpa")
    image = make_image(tmp_path / "disk.img", transport_checks.IMAGE_SIZE)   # sparse
    seed = os.urandom(4).hex()
    plan = {"scenario": "vdpa", "seed": seed, "queues": QUEUES, "serial": "vblk-image",
            "nbd_via": "vdpa", "bench_seconds": BENCH_SECONDS, "bench_rounds": BENCH_ROUNDS}
    t0 = time.monotonic()
    sr = transport_guest.run_scenario(
        str(tmp_path), plan, modules=["9p", "blk", "vdpa"], timeout=GUEST_TIMEOUT,
        disks=[transport_guest.Disk(str(image), slot=4, serial="vblk-image",
                                    num_queues=QUEUES)],
        progress=print)
    info = sr.results.get("vblk_info")
    if info:
        print(f"vblk info vdpa={sr.results.get('vhost_vdpa')} in the guest:\n{info['text']}"
              f"--json:\n{json.dumps(info['json'], indent=2)}")
    judge_run(tmp_path, image, sr, seed, QUEUES, "bench-vdpa.md", t0)
    assert info, "the guest ran no vblk info"


def judge_run(tmp_path: Path, image: Path, sr, seed: str, queues: int, bench_name: str,
              t0: float) -> None:
    """What both transport guest tests assert once the guest is off: it reported success, the
    host's checks of the image pass, and the driver-only comparison was written (kept in
    tmp_path as ``bench_name`` and printed)."""
    run = sr.run
    print(f"guest: {run.result_line}; /init after {run.boot_seconds}s, powered off after "
          f"{run.seconds:.1f}s")
    assert run.ok and sr.results.get("ok"), f"the guest did not report success\n{sr.explain()}"
    assert not run.timed_out and run.returncode == 0, sr.explain()
    problems = transport_guest.host_checks(str(tmp_path), str(image), sr, seed, queues)
    used = sr.results.get("queues_used", [])
    if len(used) < queues:
        print(f"note: {queues} queues, requests on {used}")
    bench = Path(sr.share) / "bench.md"
    if bench.exists():
        shutil.copy(bench, tmp_path / bench_name)
        print(bench.read_text())
    print(f"whole test: {time.monotonic() - t0:.1f}s")
    assert not problems, "\n".join(problems)
    assert bench.exists(), "the guest wrote no bench.md"
