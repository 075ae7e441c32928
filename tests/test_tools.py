"""The shared pieces the tests, scripts/soak and the benchmarks rely on: the one
qemu-storage-daemon command line (vblk_plugin.qsd), the install hint, parse_size, pattern and
first_difference (vblk_tools), and the harness's readiness checks, against real programs."""
from __future__ import annotations

import os
import socket
import struct
import subprocess

import pytest

import dmlog
from conftest import need_module, need_program
from vblk_plugin.qsd import Node, accepts_connection, install_package, missing_daemon_hint, qsd_argv
from vblk_tools import needs
from vblk_tools.cli import parse_size
from vblk_tools.harness import HarnessError, Nbdkit, Qsd, chain_without_discard, nbd_greeting
from vblk_tools.patterns import assert_same_bytes, first_difference, pattern
from vblk_tools.verify import VerifiedWorker

MiB = 1 << 20


def _blockdevs(argv: list[str]) -> list[dict[str, str]]:
    out = []
    for flag, value in zip(argv[1::2], argv[2::2], strict=True):
        if flag == "--blockdev":
            out.append(dict(kv.split("=", 1) for kv in value.split(",")))
    return out


def _export(argv: list[str]) -> dict[str, str]:
    value = argv[argv.index("--export") + 1]
    return dict(kv.split("=", 1) for kv in value.split(","))


# --- qsd_argv ----------------------------------------------------------------------------------

def test_argv_defaults_discard_on_both_nodes():
    argv = qsd_argv("/img/disk.img", "/run/v.sock")
    assert argv[0] == "qemu-storage-daemon"
    file_node, fmt_node = _blockdevs(argv)
    assert file_node == {"driver": "file", "node-name": "file0", "filename": "/img/disk.img",
                         "discard": "unmap", "aio": "threads"}
    assert fmt_node == {"driver": "raw", "node-name": "fmt0", "file": "file0", "discard": "unmap"}
    assert _export(argv) == {"type": "vhost-user-blk", "id": "exp0", "node-name": "fmt0",
                             "addr.type": "unix", "addr.path": "/run/v.sock", "writable": "on",
                             "num-queues": "1"}


def test_argv_options():
    argv = qsd_argv("d.qcow2", "s.sock", fmt="qcow2", aio="native", num_queues=4, writable=False,
                    logical_block_size=4096)
    file_node, fmt_node = _blockdevs(argv)
    assert file_node["aio"] == "native" and file_node["cache.direct"] == "on"
    assert fmt_node["driver"] == "qcow2"
    exp = _export(argv)
    assert (exp["writable"], exp["num-queues"], exp["logical-block-size"]) == ("off", "4", "4096")


def test_argv_filters_between_file_and_format_node():
    log = Node("file", "log0", {"filename": "/tmp/writes.log"})
    blw = Node("blklogwrites", "blw0", {"log": "log0"})
    nodes = _blockdevs(qsd_argv("d.img", "s.sock", filters=[blw], extra_nodes=[log]))
    assert [n["node-name"] for n in nodes] == ["log0", "file0", "blw0", "fmt0"]
    assert nodes[2] == {"driver": "blklogwrites", "node-name": "blw0", "file": "file0",
                        "discard": "unmap", "log": "log0"}
    assert nodes[3]["file"] == "blw0"


def test_argv_nbd_export():
    argv = qsd_argv("d.img", "n.sock", export="nbd")
    assert argv[argv.index("--nbd-server") + 1] == "addr.type=unix,addr.path=n.sock"
    assert _export(argv) == {"type": "nbd", "id": "exp0", "node-name": "fmt0", "name": "",
                             "writable": "on"}


def test_argv_escapes_commas():
    argv = qsd_argv("/a,b.img", "/s.sock")
    assert "filename=/a,,b.img" in argv[argv.index("--blockdev") + 1]


@pytest.mark.parametrize("kw", [{"fmt": "vmdk"}, {"aio": "posix"}, {"export": "iscsi"},
                                {"num_queues": 0}, {"logical_block_size": 1000},
                                {"logical_block_size": 256}])
def test_argv_refuses(kw):
    with pytest.raises(ValueError):
        qsd_argv("d.img", "s.sock", **kw)


# --- install hint ------------------------------------------------------------------------------

@pytest.mark.parametrize("os_release,debian_version,package", [
    ('ID=debian\nVERSION_ID="12"\n', "12.11\n", "qemu-system-common"),
    ('ID=debian\nVERSION_ID="13"\n', "13.1\n", "qemu-utils"),
    ("", "12.5\n", "qemu-system-common"),
    ("", "13.0\n", "qemu-utils"),
    ("ID=debian\n", "trixie/sid\n", "qemu-utils"),
    ("ID=fedora\nVERSION_ID=40\n", "", None),
])
def test_install_package(os_release, debian_version, package):
    assert install_package(os_release, debian_version) == package


def test_missing_daemon_hint_on_this_machine():
    with open("/etc/debian_version") as f:
        major = f.read().split(".")[0]
    want = {"12": "qemu-system-common", "13": "qemu-utils"}[major]
    assert missing_daemon_hint() == f"apt-get install {want} (or run scripts/setup)"


# --- parse_size, pattern, first_difference -----------------------------------------------------

@pytest.mark.parametrize("text,size", [("4096", 4096), ("4k", 4096), ("4K", 4096),
                                       ("256M", 256 * MiB), ("1G", 1 << 30), ("1GiB", 1 << 30),
                                       ("1gb", 1 << 30), ("1.5G", 3 << 29), (" 2m ", 2 * MiB),
                                       ("512b", 512)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "1x", "-1M", "1.5", "1..5G", "1 G B"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_pattern():
    p = pattern(4096, seed=3)
    assert len(p) == 4096 and len({p[i:i + 512] for i in range(0, 4096, 512)}) == 8
    assert pattern(1000, seed=3) == p[:1000]
    assert pattern(1024, seed=3, base=2048) == p[2048:3072]
    assert max(p) < 0x80


def test_first_difference():
    a = bytes(3 * MiB)
    assert first_difference(a, a) is None
    b = bytearray(a)
    b[2 * MiB + 5] = 1
    assert first_difference(a, b) == 2 * MiB + 5
    assert first_difference(a, a[:100]) == 100
    with pytest.raises(AssertionError, match=f"first difference at byte {2 * MiB + 5}"):
        assert_same_bytes(b, a, "x")


# --- the harness against real programs ---------------------------------------------------------

def test_accepts_connection_and_greeting_probes(tmp_path):
    path = str(tmp_path / "s.sock")
    assert not accepts_connection(path) and not nbd_greeting(path, 0.5)
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    assert not accepts_connection(path)       # bound, not listening: a half-started server
    s.listen(1)
    assert accepts_connection(path)
    assert not nbd_greeting(path, 0.2)        # listens but says nothing: not an NBD server
    s.close()


def test_qsd_trim_reaches_the_image(tmp_path):
    """Through the harness's daemon and nbdkit+vblk: data written reaches the image file, and a
    trim really frees it (discard=unmap on both nodes: with the default discard=ignore on
    either, the trim would complete and change nothing)."""
    data = os.urandom(4 * MiB)
    qsd = Qsd(tmp_path, size=16 * MiB, num_queues=2).start()
    kit = Nbdkit(tmp_path, [f"socket={qsd.socket}"]).start()
    try:
        h = kit.connect()
        h.pwrite(data, 4 * MiB)
        h.flush()
        assert_same_bytes(qsd.read_image(4 * MiB, 4 * MiB), data, "image after write")
        allocated = os.stat(qsd.image).st_blocks
        assert allocated * 512 >= 4 * MiB
        h.trim(4 * MiB, 4 * MiB)
        h.flush()
        assert h.pread(4 * MiB, 4 * MiB) == bytes(4 * MiB)
        h.shutdown()
        assert kit.stop().status == 0, kit.log_text()
        assert qsd.read_image(4 * MiB, 4 * MiB) == bytes(4 * MiB)
        assert os.stat(qsd.image).st_blocks * 512 <= allocated * 512 - 4 * MiB, \
            "the trim did not punch a hole in the image"
    finally:
        kit.cleanup()
        qsd.cleanup()


def test_harness_reports_a_daemon_that_cannot_start(tmp_path):
    qsd = Qsd(tmp_path, size=MiB, fmt="qcow2")     # a raw file is not a qcow2 image
    with pytest.raises(HarnessError, match="exited with status 1 before it was ready"):
        qsd.start()
    assert qsd.proc is None and not qsd.running


def test_nbdkit_ready_means_greeting(tmp_path):
    """start() returns only once nbdkit sends the NBD greeting: at once afterwards a client
    gets the export, with the plugin's device session already up."""
    qsd = Qsd(tmp_path, size=MiB).start()
    kit = Nbdkit(tmp_path, [f"socket={qsd.socket}"], stats=True).start()
    try:
        out = subprocess.run(["nbdinfo", "--size", kit.uri], capture_output=True, text=True,
                             timeout=20)
        assert out.stdout.strip() == str(MiB), out
    finally:
        kit.cleanup()
        qsd.cleanup()


# --- the discard check, the write-log reader, worker crashes, missing tools -------------------

def test_chain_without_discard():
    assert chain_without_discard(qsd_argv("d.img", "s.sock")) == []
    blw = Node("blklogwrites", "lw0", {"log": "log0"})
    log = Node("file", "log0", {"filename": "w.log"})    # not in the chain: needs nothing
    assert chain_without_discard(qsd_argv("d.img", "s.sock", filters=[blw],
                                          extra_nodes=[log])) == []
    argv = qsd_argv("d.img", "s.sock")
    bad = [a.replace(",discard=unmap", "") if a.startswith("driver=raw") else a for a in argv]
    assert chain_without_discard(bad) == ["fmt0 (raw)"]
    bad = [a.replace("discard=unmap", "discard=ignore") if a.startswith("driver=file") else a
           for a in argv]
    assert chain_without_discard(bad) == ["file0 (file)"]
    with pytest.raises(ValueError):
        chain_without_discard(["qemu-storage-daemon"])


def _log_bytes(entries: list[tuple[int, int, int, bytes]], with_super: bool = True) -> bytes:
    """A dm-log-writes log built by hand: (sector, nr_sectors, flags, data) per entry."""
    out = bytearray(512)
    if with_super:
        struct.pack_into("<QQQI", out, 0, dmlog.MAGIC, 1, len(entries), 512)
    for sector, nr, flags, data in entries:
        entry = bytearray(512)
        struct.pack_into("<QQQQ", entry, 0, sector, nr, flags, 0)
        out += entry + data
    return bytes(out) + bytes(512)


def test_write_log_reader():
    a, b = b"a" * 1024, b"b" * 512
    raw = _log_bytes([(2, 2, 0, a), (0, 0, dmlog.FLUSH, b""), (4, 1, dmlog.FUA, b),
                      (2, 1, dmlog.DISCARD, b"")])
    log = dmlog.WriteLog(raw)
    assert [str(e) for e in log.entries] == ["write(1024+1024)", "flush", "write(2048+512 fua)",
                                             "discard(1024+512)"]
    assert log.payload(log.entries[0]) == a and log.last_flush() == 1
    assert log.replay(bytearray(4096)) == bytes(1024) + bytes(512) + b"a" * 512 + b + bytes(1536)
    assert log.durable(4096) == bytes(1024) + a + bytes(2048)    # up to the flush only
    assert [str(e) for e in log.since(3)] == ["discard(1024+512)"]
    # before qemu first writes the super, the entries are there already
    unsupered = dmlog.WriteLog(_log_bytes([(2, 2, 0, a)], with_super=False))
    assert [str(e) for e in unsupered.entries] == ["write(1024+1024)"]
    with pytest.raises(dmlog.LogError, match="not a dm-log-writes log"):
        dmlog.WriteLog(b"x" * 1024)
    with pytest.raises(dmlog.LogError, match="cut off"):
        dmlog.WriteLog(raw[:512 + 512 + 100])
    with pytest.raises(dmlog.LogError, match="counts 9 entries"):
        dmlog.WriteLog(bytes(struct.pack("<QQQI", dmlog.MAGIC, 1, 9, 512)).ljust(1024, b"\0"))


def test_verified_worker_records_any_exception():
    class Broken(VerifiedWorker):
        def connect(self):
            raise RuntimeError("not an nbd.Error")

    w = Broken("/nonexistent.sock", 0, 8192)
    w.run()
    assert w.errors and "RuntimeError: not an nbd.Error" in w.errors[0], w.errors
    w.verify_all()
    assert len(w.errors) == 2 and "RuntimeError" in w.errors[1], w.errors


def test_missing_tools_fail_naming_the_package():
    with pytest.raises(pytest.fail.Exception, match="apt-get install vblk-no-such-package"):
        need_program("vblk-no-such-program", "vblk-no-such-package")
    with pytest.raises(pytest.fail.Exception, match="python3-vblk-nothing"):
        need_module("vblk_no_such_module", "python3-vblk-nothing")
    assert need_program("nbdkit", "nbdkit").endswith("/nbdkit")


def test_needs_names_each_missing_program_or_file():
    """A program is looked up on PATH, an absolute path (a glob pattern) must exist."""
    assert needs.missing({"sh": "dash", "/bin/s?": "dash", "/nonexistent/*.so": "vblk-lib",
                          "vblk-no-such-program": "vblk-pkg"}) == [
        "/nonexistent/*.so (package vblk-lib)", "vblk-no-such-program (package vblk-pkg)"]
    with pytest.raises(needs.Missing, match=r"^the guest needs /nonexistent \(package a\): "
                                            r"apt-get install a \(or run scripts/setup --vm"):
        needs.require({"/nonexistent": "a", "sh": "dash"}, "the guest", setup="scripts/setup --vm")


def test_nbdkit_started_once_in_a_with_block(tmp_path):
    """``with kit.start():`` runs one nbdkit (a second start would orphan the first), and a
    start of a running one is refused."""
    qsd = Qsd(tmp_path, size=MiB).start()
    kit = Nbdkit(tmp_path, [f"socket={qsd.socket}"])
    try:
        with kit.start():
            first = kit.pid
            assert kit.pid == first and kit.running
            with pytest.raises(HarnessError, match="already running"):
                kit.start()
            assert kit.pid == first
        assert not kit.running
    finally:
        kit.cleanup()
        qsd.cleanup()
