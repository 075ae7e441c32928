"""``vblk`` (plugin/vblk_plugin/cli.py) on the fakes and real files: ``vblk info``'s report
(every key, both forms), its errors (one line, exit 1), a device in use by a real nbdkit,
the export description and dump_plugin of the real plugin, ``vblk plugin-path`` and the one
version.  ``vblk stats`` is tests/test_statsview.py; the installed command against a real
qemu-storage-daemon is tests/test_install_e2e.py."""
from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_blk import T_GET_ID, qsd_like_config
from fake_vdpa import VDUSE_FEATURES, FakeVdpaDevice
from fake_vhost_user import FakeVhostUserBlk
from vblk_core import ConnectError, ControlTimeout, __version__
from vblk_core.transports.vhost_vdpa import VhostVdpaConnector
from vblk_plugin import cli, users
from vblk_plugin.examine import examine

REPO = Path(__file__).resolve().parent.parent
VBLK = [sys.executable, "-m", "vblk_plugin"]
DISK = 8 << 20
#: What the fake offers (its default, qemu-storage-daemon 7.2's word 0x175007e46), named by
#: hand from the spec's bit numbers; vhost-user's own bit 30 is the transport's business.
QSD_OFFERED = ["SIZE_MAX", "SEG_MAX", "BLK_SIZE", "FLUSH", "TOPOLOGY", "CONFIG_WCE", "MQ",
               "DISCARD", "WRITE_ZEROES", "NOTIFY_ON_EMPTY", "LOG_ALL", "INDIRECT_DESC",
               "EVENT_IDX", "VERSION_1"]
#: A config with every field away from its default, so each key is seen to come from it.
CONFIG = {"blk_size": 4096, "physical_block_exp": 3, "alignment_offset": 1, "min_io_size": 2,
          "opt_io_size": 8, "size_max": 65536, "seg_max": 60, "writeback": 1,
          "max_discard_sectors": 2048, "max_discard_seg": 3, "discard_sector_alignment": 16,
          "max_write_zeroes_sectors": 4096, "max_write_zeroes_seg": 2,
          "write_zeroes_may_unmap": 1}


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def fake(tmp_path):
    made: list[FakeVhostUserBlk] = []

    def make(**kw) -> FakeVhostUserBlk:
        kw.setdefault("num_queues", 2)
        f = FakeVhostUserBlk(tmp_path / f"vu{len(made)}.sock", bytearray(DISK), **kw).start()
        made.append(f)
        return f
    yield make
    for f in made:
        f.stop()
        assert not f.violations, f.violations


def test_info_json_reports_every_key_from_the_device(fake, capsys):
    dev = fake(config=CONFIG, serial=b"SN-0042\0garbage")
    status, out, err = run(capsys, "info", f"socket={dev.path}", "--json")
    assert (status, err) == (0, "")
    got = json.loads(out)
    assert got == {
        "vblk_version": __version__,
        "description": f"virtio-blk SN-0042 via vhost-user {dev.path}",
        "transport": "vhost-user", "target": dev.path, "serial": "SN-0042",
        "capacity": DISK, "read_only": False, "writeback_cache": True,
        "logical_block_size": 4096, "physical_block_size": 4096 << 3,
        "alignment_offset": 4096, "min_io_size": 2 * 4096, "optimal_io_size": 8 * 4096,
        "size_max": 65536, "seg_max": 60,
        "discard": {"max_bytes": 2048 * 512, "max_segments": 3, "alignment": 16 * 512},
        "write_zeroes": {"max_bytes": 4096 * 512, "max_segments": 2, "may_unmap": True},
        "num_queues": 2, "max_queue_size": None,
        "features_offered": QSD_OFFERED,
        "features_negotiated": got["features_negotiated"],
    }
    negotiated = got["features_negotiated"]
    assert set(negotiated) < set(QSD_OFFERED)
    assert {"VERSION_1", "MQ", "EVENT_IDX", "DISCARD", "WRITE_ZEROES"} <= set(negotiated)
    assert not {"LOG_ALL", "NOTIFY_ON_EMPTY", "INDIRECT_DESC"} & set(negotiated)
    # at the device: one session that asked for the serial once, then one that only negotiated
    assert dev.connections == 2
    assert [s.type for s in dev.served] == [T_GET_ID], dev.served


def test_info_text_has_the_same_keys_and_escapes_the_serial(fake, capsys):
    dev = fake(serial=b"sn\x1b[31m\\x")
    status, out, err = run(capsys, "info", f"socket={dev.path}")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"device: virtio-blk sn\\x1b[31m\\x5cx via vhost-user {dev.path}"
    keys = [line.split(":", 1)[0].strip() for line in lines[1:]]
    status, js, _ = run(capsys, "info", f"socket={dev.path}", "--json")
    assert keys == [k for k in json.loads(js) if k not in ("description", "vblk_version")]
    assert all(line.startswith("\t") for line in lines[1:])
    assert "\tcapacity: 8388608 (8M)" in lines
    assert "\tmax_queue_size: (no limit stated below virtio's 32768)" in lines
    assert "\x1b" not in out


def test_a_device_without_a_serial_is_reported_without_one(fake, capsys):
    dev = fake(io_fault="bad_status", bad_status=2, io_fault_count=None)  # UNSUPP
    status, out, err = run(capsys, "info", f"socket={dev.path}", "--json")
    assert (status, err) == (0, "")
    got = json.loads(out)
    assert got["serial"] is None
    assert got["description"] == f"virtio-blk via vhost-user {dev.path}"
    assert dev.injected["bad_status"] == 1   # at the device: its one GET_ID
    status, out, err = run(capsys, "info", f"socket={dev.path}")
    assert re.search(r"\tserial: \(none: .*unsupported\)", out), out


def one_line_error(capsys, *args: str) -> str:
    status, out, err = run(capsys, *args)
    assert status == 1 and out == "", (status, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"vblk {args[0]}: "), err
    return err


def test_device_errors_are_one_line_naming_the_problem_and_the_fix(tmp_path, fake, capsys):
    regular = tmp_path / "file"
    regular.write_bytes(b"x")
    cases = [
        (f"socket={tmp_path}/none.sock", "does not exist: start the back-end"),
        (f"socket={regular}", "is not a unix socket: point it at the vhost-user-blk"),
        ("vdpa=/dev/null", "not a vhost-vdpa device: give the /dev/vhost-vdpa-N"),
        (f"vdpa={regular}", "is not a character device: give /dev/vhost-vdpa-N"),
        ("pci=0000:ff:1f.7", "no such PCI device: list them with lspci -D"),
        ("pci=nonsense", "pci="),
        (f"image={regular}", "run qemu-img info on the image instead"),
        ("size=1", "is not a device: give socket=PATH"),
        (f"socket={fake(config={'capacity': 0}).path}", "capacity 0: nothing to serve"),
        (f"socket={fake(io_fault='bad_status').path}", "invalid status 7"),
    ]
    for arg, expected in cases:
        err = one_line_error(capsys, "info", arg)
        assert expected in err, (arg, err)
        assert arg.split("=")[0] in err, (arg, err)


def test_a_hung_back_end_is_a_bounded_wait(fake, capsys):
    dev = fake(silent_from=1)
    t0 = time.monotonic()
    err = one_line_error(capsys, "info", f"socket={dev.path}", "--timeout", "0.5")
    assert time.monotonic() - t0 < 3.0
    assert "did not answer" in err and "serves one front-end at a time" in err, err
    assert "the back-end is hung" in err, err


def test_a_back_end_in_use_by_nbdkit_says_so(fake, nbdkit_factory, capsys):
    dev = fake()
    kit = nbdkit_factory([f"socket={dev.path}", "num-queues=1"])
    t0 = time.monotonic()
    err = one_line_error(capsys, "info", f"socket={dev.path}", "--timeout", "0.5")
    assert time.monotonic() - t0 < 3.0
    assert f"is in use by nbdkit (pid {kit.pid})" in err, err
    assert "`vblk stats`" in err, err


def test_users_are_found_by_command_line_and_by_open_files(tmp_path):
    """A real process named nbdkit naming devices relative to its own directory, and this
    process holding a device file open."""
    script = "import time; time.sleep(60)"
    proc = subprocess.Popen(["bash", "-c", f"exec -a nbdkit {sys.executable} -c '{script}' "
                             "socket=rel.sock pci=00:04.0"], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"nbdkit\0"):
            assert time.monotonic() < deadline, "bash did not exec"
            time.sleep(0.01)
        me = users.Holder(proc.pid, "nbdkit")
        assert me in users.nbdkit_users("socket", str(tmp_path / "rel.sock"))
        assert me not in users.nbdkit_users("socket", str(tmp_path / "other.sock"))
        assert me in users.nbdkit_users("pci", "0000:00:04.0")
        assert me not in users.nbdkit_users("vdpa", str(tmp_path / "rel.sock"))
        message = users.busy_message("socket", str(tmp_path / "rel.sock"),
                                     ControlTimeout("did not answer"))
        assert f"is in use by nbdkit (pid {proc.pid}); a vhost-user back-end" in message
    finally:
        proc.kill()
        proc.wait()
    node = tmp_path / "vhost-vdpa-9"
    node.touch()
    with open(node):
        assert os.getpid() in [h.pid for h in users.file_holders(str(node))]
        message = users.busy_message("vdpa", str(node), ConnectError("busy", errno.EBUSY))
        assert f"(pid {os.getpid()}): stop it first" in message, message
    assert os.getpid() not in [h.pid for h in users.file_holders(str(node))]


def test_vdpa_devices_through_examine(capsys):
    """The vhost-vdpa transport's report and its refusals, on the fake device file."""
    disk = bytearray(DISK)
    good = FakeVdpaDevice(disk, qsd_like_config(DISK, 2))
    report = examine(VhostVdpaConnector("/dev/vhost-vdpa-3", ops=good), "vhost-vdpa",
                     "/dev/vhost-vdpa-3").as_json()
    assert (report["num_queues"], report["max_queue_size"], report["capacity"]) == (2, 256, DISK)
    assert "ACCESS_PLATFORM" not in report["features_offered"]    # the transport's own bit
    assert "INDIRECT_DESC" in report["features_offered"]           # offered, not negotiated
    assert "INDIRECT_DESC" not in report["features_negotiated"]
    assert VDUSE_FEATURES >> 28 & 1, "the fake offers INDIRECT_DESC (bit 28)"
    net = FakeVdpaDevice(disk, qsd_like_config(DISK, 1), device_id=1)
    with pytest.raises(ConnectError, match="is not a block device"):
        examine(VhostVdpaConnector("/dev/vhost-vdpa-3", ops=net), "vhost-vdpa", "x")
    busy = FakeVdpaDevice(disk, qsd_like_config(DISK, 1), open_errno=errno.EBUSY)
    with pytest.raises(ConnectError, match="busy") as caught:
        examine(VhostVdpaConnector("/dev/vhost-vdpa-3", ops=busy), "vhost-vdpa", "x")
    assert caught.value.errno == errno.EBUSY


def test_usage_errors_exit_2():
    for args in ([], ["info"], ["nonsense"], ["stats"]):
        r = subprocess.run([*VBLK, *args], capture_output=True, text=True)
        assert r.returncode == 2 and "usage: vblk" in r.stderr, (args, r.stderr)


def test_plugin_path_version_and_dump_plugin(tmp_path):
    """One version everywhere; in this editable install, plugin-path is the checkout's file,
    and nbdkit loads it from any directory (its dump_plugin adds vblk's keys)."""
    path = subprocess.run([*VBLK, "plugin-path"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert path == str(REPO / "plugin" / "vblk_plugin" / "nbdkit_plugin.py")
    version = subprocess.run([*VBLK, "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert version == f"vblk {__version__}\n"
    assert importlib.metadata.version("vblk") == __version__   # pyproject reads the same
    for plugin in (path, str(REPO / "plugin" / "plugin.py")):
        r = subprocess.run(["nbdkit", "python", plugin, "--dump-plugin"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert f"vblk_version={__version__}\n" in r.stdout
        assert "vblk_transports=vhost-user,vhost-vdpa,vfio-pci\n" in r.stdout


def test_the_export_describes_the_device(fake, nbdkit_factory):
    named, anonymous = fake(serial=b"disk-7"), fake(io_fault="bad_status", bad_status=2,
                                                   io_fault_count=None)
    cases = [(named, f"virtio-blk disk-7 via vhost-user {named.path}"),
             (anonymous, f"virtio-blk via vhost-user {anonymous.path}")]
    for dev, want in cases:
        kit = nbdkit_factory([f"socket={dev.path}"])
        # --no-content: nbdinfo 1.14 prints garbage as "content" where file(1) is missing
        r = subprocess.run(["nbdinfo", "--json", "--no-content", kit.uri], capture_output=True,
                           text=True, timeout=30, check=True)
        h = kit.connect()
        try:   # a second connection: the serial was read once, at start-up
            assert h.get_size() == DISK
        finally:
            h.shutdown()
        kit.stop()
        assert json.loads(r.stdout)["exports"][0]["description"] == want
        assert [s.type for s in dev.served].count(T_GET_ID) == 1, dev.served
