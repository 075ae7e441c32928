"""vblk installed the way a user installs it, against real programs.

From a clean clone of the committed HEAD (``git clone``: what is not committed is not tested
here), in a fresh venv made as scripts/setup makes it (``/usr/bin/python3 -m venv
--system-site-packages``): ``pip install -e`` and then ``pip install`` of the clone, both
without the network (``--no-build-isolation --no-index``: Debian's setuptools builds it).
The clone is then deleted, so everything after runs on the installed copy alone:

- ``vblk info`` against a real qemu-storage-daemon export (its size, queue count, block size,
  read-only flag and serial as configured; ``--json`` parsed, and the human form);
- nbdkit running ``"$(vblk plugin-path)"`` from another directory, ``nbdinfo`` showing the
  export's description, the data landing in the image;
- ``vblk info`` on the device nbdkit holds: "in use by nbdkit (pid N)" after a bounded wait,
  and the daemon taking the next front-end once nbdkit is gone;
- ``vblk stats`` on the running nbdkit's stats= file, across a restart of nbdkit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vblk_core import __version__

REPO = Path(__file__).resolve().parent.parent
GiB, MiB = 1 << 30, 1 << 20
QSD_SERIAL = "vhost_user_blk"   # what qemu-storage-daemon's vhost-user-blk export answers


@dataclass
class Installed:
    venv: Path
    vblk: str
    plugin: str              # `vblk plugin-path` after the regular install
    editable_plugin: str     # ... after the editable one
    editable_clone: Path
    editable_dump: str       # nbdkit --dump-plugin on the editable install's plugin file

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.vblk, *args], capture_output=True, text=True,
                              timeout=timeout)


def _pip(venv: Path, *args: str) -> None:
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "--no-build-isolation", "--no-index",
                        *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"pip install {' '.join(args)} failed:\n{r.stdout}{r.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("install")
    clone, venv, elsewhere = base / "clone", base / "venv", base / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    vblk = str(venv / "bin" / "vblk")
    _pip(venv, "-e", str(clone))
    editable = subprocess.run([vblk, "plugin-path"], capture_output=True, text=True,
                              check=True).stdout.strip()
    dump = subprocess.run(["nbdkit", "python", editable, "--dump-plugin"], cwd=elsewhere,
                          capture_output=True, text=True, timeout=30).stdout
    _pip(venv, str(clone))
    shutil.rmtree(clone)        # from here on only the installed copy exists
    plugin = subprocess.run([vblk, "plugin-path"], capture_output=True, text=True,
                            check=True).stdout.strip()
    return Installed(venv, vblk, plugin, editable, clone, dump)


def test_both_installs_give_the_command_and_the_plugin_file(installed, tmp_path):
    assert installed.editable_plugin == str(installed.editable_clone / "plugin" / "vblk_plugin"
                                            / "nbdkit_plugin.py")
    assert f"vblk_version={__version__}\n" in installed.editable_dump
    site = Path(installed.plugin).parent.parent
    assert Path(installed.plugin) == site / "vblk_plugin" / "nbdkit_plugin.py"
    assert site.is_relative_to(installed.venv) and site.name == "site-packages"
    # every module of the checkout (at the same commit) is installed
    for package, source in (("vblk_core", REPO / "vblk_core"),
                            ("vblk_plugin", REPO / "plugin" / "vblk_plugin")):
        modules = [p.relative_to(source) for p in source.rglob("*.py")]
        assert modules and all((site / package / m).is_file() for m in modules), package
    for typed in ("vblk_core", "vblk_plugin"):
        assert (site / typed / "py.typed").is_file(), typed
    assert installed.run("--version").stdout == f"vblk {__version__}\n"
    r = subprocess.run([str(installed.venv / "bin" / "python"), "-m", "vblk_plugin",
                        "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert r.stdout == f"vblk {__version__}\n"
    r = subprocess.run(["nbdkit", "python", installed.plugin, "--dump-plugin"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=30)
    assert f"vblk_version={__version__}\n" in r.stdout, r.stderr
    licence = list(site.glob("vblk-*.dist-info/**/LICENSE*"))   # in licenses/ with PEP 639
    assert licence and "MIT License" in licence[0].read_text()


def test_info_on_a_real_export(installed, qsd_factory):
    qsd = qsd_factory(num_queues=3, size=48 * MiB, logical_block_size=4096)
    r = installed.run("info", f"socket={qsd.socket}", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    got = json.loads(r.stdout)
    assert (got["capacity"], got["num_queues"], got["logical_block_size"], got["serial"],
            got["read_only"]) == (48 * MiB, 3, 4096, QSD_SERIAL, False)
    assert got["description"] == f"virtio-blk {QSD_SERIAL} via vhost-user {qsd.socket}"
    assert {"MQ", "DISCARD", "WRITE_ZEROES", "VERSION_1"} <= set(got["features_negotiated"])
    text = installed.run("info", f"socket={qsd.socket}")
    assert text.returncode == 0
    print(f"$ vblk info socket={qsd.socket}\n{text.stdout}\n$ vblk info ... --json\n{r.stdout}")
    assert text.stdout.startswith(f"device: {got['description']}\n")
    assert "\tcapacity: 50331648 (48M)\n" in text.stdout and "\tnum_queues: 3\n" in text.stdout
    ro = qsd_factory(size=8 * MiB, writable=False)
    got = json.loads(installed.run("info", f"socket={ro.socket}", "--json").stdout)
    assert got["read_only"] is True and "RO" in got["features_offered"]


class Reader(threading.Thread):
    """Collects a process's output lines as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc, self.lines = proc, []
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            assert time.monotonic() < deadline, f"vblk stats never showed {what}:\n" + \
                "\n".join(self.lines)
            time.sleep(0.05)


def busy_reports(lines: list[str]) -> int:
    """Reports whose total line shows requests per second above zero."""
    return sum(1 for line in lines if line.split()[:1] == ["all"] and float(line.split()[1]) > 0)


def test_served_by_the_installed_plugin(installed, qsd_factory, nbdkit_factory, tmp_path):
    qsd = qsd_factory(num_queues=2, size=64 * MiB)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kit = nbdkit_factory([f"socket={qsd.socket}", "num-queues=2"], plugin=installed.plugin,
                         stats=True, cwd=elsewhere)
    stats = None
    try:
        # --no-content: nbdinfo 1.14 prints garbage as "content" where file(1) is missing
        info = json.loads(subprocess.run(["nbdinfo", "--json", "--no-content", kit.uri],
                                         capture_output=True, text=True, timeout=30,
                                         check=True).stdout)
        export = info["exports"][0]
        assert export["description"] == f"virtio-blk {QSD_SERIAL} via vhost-user {qsd.socket}"
        assert export["export-size"] == 64 * MiB

        # the device is nbdkit's: a bounded wait, then who has it
        t0 = time.monotonic()
        r = installed.run("info", f"socket={qsd.socket}", "--timeout", "1")
        assert time.monotonic() - t0 < 5
        assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1, r
        assert f"is in use by nbdkit (pid {kit.pid})" in r.stderr, r.stderr

        # vblk stats across a restart of nbdkit
        stats = subprocess.Popen([installed.vblk, "stats", str(kit.stats_path), "--interval",
                                  "0.25"], stdout=subprocess.PIPE, text=True, cwd=elsewhere)
        reader = Reader(stats)
        data = os.urandom(64 * 1024)

        def write_until(predicate, what: str) -> None:
            h = kit.connect()
            try:
                deadline = time.monotonic() + 30
                n = 0
                while not predicate(reader.lines):
                    assert time.monotonic() < deadline, f"no {what}:\n" + "\n".join(reader.lines)
                    h.pwrite(data, n % 512 * len(data))
                    n += 1
            finally:
                h.shutdown()
            assert qsd.read_image(0, len(data)) == data          # where it lands

        write_until(lambda lines: busy_reports(lines) >= 1, "report with requests")
        kit.stop()
        kit.start()
        write_until(lambda lines: any("counters restarted" in x for x in lines)
                    and busy_reports(lines[next(i for i, x in enumerate(lines)
                                                if "counters restarted" in x):]) >= 1,
                    "restart, then a report with requests")
        # SIGTERM, not ^C's SIGINT: a test runner may start us with SIGINT ignored (then
        # inherited: Python installs no KeyboardInterrupt handler)
        stats.terminate()
        assert stats.wait(10) == -signal.SIGTERM
        reader.join(5)
        print("\n".join(reader.lines))
        assert reader.lines[0] == f"vblk stats {kit.stats_path}: every 0.25 s (Ctrl-C to stop)"
        restarts = [line for line in reader.lines if "counters restarted" in line]
        assert len(restarts) == 1 and f"nbdkit pid {kit.pid}," in restarts[0], restarts
        assert {"0", "1", "all"} <= {line.split()[0] for line in reader.lines if line}
    finally:
        if stats is not None and stats.poll() is None:
            stats.kill()      # our child, by its PID
            stats.wait()
        kit.stop()
    # nbdkit gone: the daemon takes the next front-end (also after the abandoned connection)
    r = installed.run("info", f"socket={qsd.socket}", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_queues"] == 2
