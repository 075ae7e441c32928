"""scripts/soak for a minute with the back-end killed twice (issue 5): no error, and what nbdkit's
stats say about the device (reconnects, failed requests, requests and bytes carried) agrees with
what the clients did; every fio run verified exactly the bytes it wrote."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import need_program

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "scripts" / "soak"


@pytest.mark.slow
def test_soak_one_minute_with_daemon_kills(tmp_path):
    out = tmp_path / "summary.json"
    need_program("fio", "fio")
    cmd = [sys.executable, str(SOAK), "--seconds", "60", "--kill-every", "20",
           "--connections", "4", "--depth", "8", "--image-size", "256M",
           "--workdir", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    last = proc.stdout.strip().splitlines()[-1]
    assert re.match(r"soak: PASS ops=\d+ errors=0 ", last), f"no PASS summary: {last!r}\n{report}"
    s = json.loads(out.read_text())
    assert s["result"] == "PASS" and s["error_messages"] == [], report
    # What nbdkit and the device say, not what the soak counted itself: each kill (at 20 s and
    # 40 s) was one reconnect, the device failed nothing, and carried every byte the clients
    # moved (libnbd reads and writes, fio's writes and verify reads) and every request.
    assert s["reconnects"] == 2, s
    assert s["device_errors"] == 0, s
    assert s["image_compared"] is True
    kinds = ("read", "write", "zero", "trim", "flush")
    assert all(s["libnbd_ops_by_kind"][k] > 0 for k in kinds), s
    assert s["device_requests"] >= s["libnbd_ops"] + s["fio_ops"], s
    assert s["device_bytes"] >= (s["libnbd_bytes_verified"] + s["fio_bytes_written"]
                                 + s["fio_bytes_verified"]), s
    # fio: whole runs, each verifying exactly what it wrote (64 MiB per job and run)
    assert s["fio_runs"] >= 1 and s["fio_bytes_written"] >= 2 * 64 << 20, s
    assert s["fio_bytes_verified"] == s["fio_bytes_written"], s
    # A request waited through a kill, but none waited anywhere near reconnect-timeout (30 s).
    assert 0.5 < s["libnbd_max_latency_s"] < 15, s
    print(last)
