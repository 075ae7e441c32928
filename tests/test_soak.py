"""scripts/soak for a minute with the back-end killed twice (issue 5): no error, every number in
the summary adds up."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "scripts" / "soak"


@pytest.mark.slow
def test_soak_one_minute_with_daemon_kills(tmp_path):
    out = tmp_path / "summary.json"
    fio = shutil.which("fio") is not None
    cmd = [sys.executable, str(SOAK), "--seconds", "60", "--kill-every", "20",
           "--connections", "4", "--depth", "8", "--image-size", "256M",
           "--workdir", str(tmp_path / "work"), "--json", str(out)]
    if not fio:
        cmd += ["--fio-jobs", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, report
    last = proc.stdout.strip().splitlines()[-1]
    m = re.match(r"soak: PASS ops=(\d+) errors=(\d+) faults_injected=(\d+) bytes_verified=(\d+)",
                 last)
    assert m, f"no summary line: {last!r}\n{report}"
    ops, errors, faults, verified = map(int, m.groups())
    s = json.loads(out.read_text())
    assert (s["ops"], s["errors"], s["faults_injected"], s["bytes_verified"]) == \
        (ops, errors, faults, verified)
    assert errors == 0 and s["error_messages"] == [], report
    # Kills at 20 s and 40 s; each one seen by nbdkit as exactly one reconnect.
    assert faults == 2 and s["faults_by_kind"] == {"daemon-kill-9": 2}, s
    assert s["reconnects"] == 2, s
    assert s["image_compared"] is True
    assert ops == s["libnbd_ops"] + s["fio_ops"]
    assert s["libnbd_ops"] > 2000, s
    kinds = ("read", "write", "zero", "trim", "flush")
    assert all(s["libnbd_ops_by_kind"][k] > 0 for k in kinds), s
    if fio:
        assert s["fio_ops"] > 2000 and s["fio_bytes_verified"] > 0, s
    # The final read-back alone is 128 MiB.
    assert verified >= s["libnbd_bytes_verified"] > 2 * 64 << 20, s
    # A request waited through a kill, but none waited anywhere near reconnect-timeout (30 s).
    assert 0.5 < s["libnbd_max_latency_s"] < 15, s
    assert s["device_requests"] >= ops, s   # every NBD request reached the device
    print(last)
