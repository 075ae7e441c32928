"""What a device can do to the process through its control path, other than answer wrongly
(tests/test_hostile_device.py has those): a vhost-user back-end that stops reading its socket,
hangs up on it or attaches fds we never asked for, a vDPA device that announces sizes no device
has.  Each ends in an error (or nothing at all), never in a process blocked for good, killed by
SIGPIPE or filling up with fds.  (A reply that trickles in a byte at a time is
test_hostile_device's "trickle" case.)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from device_util import open_device
from fake_ring_device import qsd_like_config
from fake_vdpa import FakeVdpaDevice
from fake_vhost_user import FakeVhostUserBlk
from vblk_core import BlockDevice, ConfigError, ControlTimeout, DeviceError, DeviceState
from vblk_core.transports.vhost_user import SessionState, VhostUserTransport
from vblk_core.transports.vhost_vdpa import VhostVdpaConnector
from vblk_tools import ROOT
from vblk_tools.patterns import pattern

TIMEOUT = 0.5
SLACK = 3.0


def _listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    s.listen(1)
    return s


def test_a_backend_that_stops_reading_cannot_block_a_send(tmp_path):
    """The back-end accepts and never reads: a message larger than the socket buffer (a
    1 MiB GET_CONFIG) cannot be sent whole; the send fails with ControlTimeout after about the
    control timeout (not never), and the session is closed."""
    listener = _listener(str(tmp_path / "deaf.sock"))
    transport = VhostUserTransport(str(tmp_path / "deaf.sock"), TIMEOUT)
    conn, _ = listener.accept()
    outcome: list[object] = []

    def fill() -> None:
        t0 = time.monotonic()
        try:
            transport.get_config(0, 1 << 20)
        except BaseException as e:  # noqa: BLE001 - judged below
            outcome.extend([e, time.monotonic() - t0])

    worker = threading.Thread(target=fill, name="test-fill", daemon=True)
    worker.start()
    worker.join(TIMEOUT + SLACK)
    stuck = worker.is_alive()
    conn.close()               # unblocks a stuck send (EPIPE), so the thread ends either way
    worker.join(5)
    listener.close()
    assert not stuck, f"a send to a back-end that stops reading blocked for {TIMEOUT + SLACK}s"
    err, took = outcome
    assert isinstance(err, ControlTimeout), repr(err)
    assert "did not accept GET_CONFIG within 0.5s" in str(err)
    assert TIMEOUT * 0.9 <= took < TIMEOUT + SLACK
    assert transport.state is SessionState.CLOSED


def test_a_backend_that_hangs_up_is_epipe_not_sigpipe(tmp_path):
    """In a process where SIGPIPE is not ignored (vblk_core is a library: not every program
    ignores it as nbdkit and Python do), a send to a back-end that closed the connection is a
    TransportError, not death by SIGPIPE."""
    script = textwrap.dedent(f"""
        import signal, socket, sys
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from vblk_core import TransportError
        from vblk_core.transports.vhost_user import VhostUserTransport
        listener = socket.socket(socket.AF_UNIX)
        listener.bind({str(tmp_path / "gone.sock")!r})
        listener.listen(1)
        transport = VhostUserTransport({str(tmp_path / "gone.sock")!r}, 2.0)
        listener.accept()[0].close()
        try:
            transport.get_config(0, 8)
        except TransportError as e:
            print("TransportError:", e)
            sys.exit(0)
        sys.exit(3)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
    assert "sending GET_CONFIG" in run.stdout and "Broken pipe" in run.stdout, run.stdout


def _stray_fds() -> list[str]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if "memfd:stray" in os.readlink(f"/proc/self/fd/{name}"):
                found.append(name)
        except OSError:
            pass
    return found


def test_fds_attached_to_replies_are_not_kept(tmp_path):
    """A back-end that attaches two fds to every reply: none of them ends up in this process
    (each would be a leak per message), and the device works as usual."""
    fake = FakeVhostUserBlk(tmp_path / "vu.sock", bytearray(1 << 22), stray_fds=2).start()
    fds_before = len(os.listdir("/proc/self/fd"))
    dev = None
    try:
        dev = open_device(fake.path, request_timeout=5)
        assert fake.injected["stray_fds"] >= 6          # the GET_* replies and every ack
        assert _stray_fds() == []
        data = pattern(64 << 10, seed=2)
        dev.pwrite(data, 4096)
        assert fake.disk[4096:4096 + len(data)] == data
        assert dev.state is DeviceState.CONNECTED
    finally:
        if dev is not None:
            dev.close()
        fake.stop()
    assert _stray_fds() == []
    assert len(os.listdir("/proc/self/fd")) <= fds_before


@pytest.mark.parametrize("config,options,exc,match", [
    (bytes(5), {}, DeviceError, r"device config is 5 bytes, need at least 8"),
    (bytes(8192), {}, DeviceError, r"reports a config space of 8192 bytes"),
    (None, {"vring_num": 0}, ConfigError, r"queue size 256 is too big: .* accepts up to 0"),
    (None, {"vring_num": 3}, ConfigError, r"accepts up to 3 entries"),
], ids=["config-5-bytes", "config-8-KiB", "vring-num-0", "vring-num-3"])
def test_vdpa_sizes_no_device_has_are_errors(config, options, exc, match):
    """A vDPA device announcing a config space too small to hold the capacity or larger than
    any virtio-blk config, or rings of 0 or 3 entries: refused at open with what it said (the
    vhost-user counterparts are test_hostile_device's absurd config and queue counts)."""
    fake = FakeVdpaDevice(bytearray(1 << 20), qsd_like_config(1 << 20, 2) if config is None
                          else config, **options)
    with pytest.raises(exc, match=match):
        BlockDevice.open(VhostVdpaConnector("/dev/vhost-vdpa-7", ops=fake))
    assert fake.opens >= 1 and fake.iotlb == {}        # closed again, nothing left mapped
