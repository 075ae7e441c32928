"""vblk's vfio-pci transport against a real PCI function, in a QEMU guest (TCG).

host image file -> QEMU virtio-blk-pci (disable-legacy, iommu_platform, 4 queues, discard=unmap)
behind the guest's intel-iommu (q35, interrupt remapping, caching mode; guest intel_iommu=on)
-> unbound from virtio-pci, bound to vfio-pci (driver_override + drivers_probe) -> nbdkit +
plugin/plugin.py ``pci=0000:00:04.0 num-queues=4`` -> libnbd (4 connections x 2 threads),
nbdcopy in and out, flush/trim/zero, FUA, the stats file.

The guest is tests/vm/transport_guest.py's (a Debian 13 kernel, the host's root over 9p),
running tests/vm/transport_checks.py; the host then checks the image byte for byte, nbdcopy's
copy of the whole export likewise, and the holes trims and zeroes left in the host file.  The
same boot measures vblk_core alone on vfio-pci vs vhost-vdpa vs vhost-user (the latter two on a
second disk behind qemu-storage-daemon's VDUSE and vhost-user-blk exports): bench.md.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import transport_checks
import transport_guest

from test_vdpa_guest import build_guest_or_fail, judge_run
from vblk_tools.harness import make_image

QUEUES = 4
SLOT = 4                       # the function under test: 0000:00:04.0
BENCH_SLOT, BENCH_QUEUES = 5, 2
BENCH_SECONDS = 1.5
BENCH_ROUNDS = 2
GUEST_TIMEOUT = 240   # hard limit; a run takes 40-70 s here


@pytest.mark.slow
def test_vfio_pci_in_guest(tmp_path, capsys):
    build_guest_or_fail(capsys, "vfio-pci")
    image = make_image(tmp_path / "disk.img", transport_checks.IMAGE_SIZE)   # sparse
    # The second disk (for the vhost-vdpa / vhost-user comparison): data where the reads go.
    bench_image = make_image(tmp_path / "bench.img", transport_checks.IMAGE_SIZE,
                             random.Random(1).randbytes(48 << 20))
    seed = os.urandom(4).hex()
    addr = transport_guest.Disk(str(image), SLOT, "").pci_address
    plan = {"scenario": "vfio", "seed": seed, "queues": QUEUES, "pci": addr,
            "bench_seconds": BENCH_SECONDS, "bench_rounds": BENCH_ROUNDS,
            "bench_serial": "vblk-bench", "bench_queues": BENCH_QUEUES}
    t0 = time.monotonic()
    sr = transport_guest.run_scenario(
        str(tmp_path), plan, modules=["9p", "blk", "vfio", "vdpa"], iommu=True,
        timeout=GUEST_TIMEOUT, progress=print,
        disks=[transport_guest.Disk(str(image), SLOT, "vblk-image", num_queues=QUEUES,
                                    iommu_platform=True),
               transport_guest.Disk(str(bench_image), BENCH_SLOT, "vblk-bench",
                                    num_queues=BENCH_QUEUES)])
    judge_run(tmp_path, image, sr, seed, QUEUES, "bench-vfio.md", t0)
