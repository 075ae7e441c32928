"""The stats= file cannot be redirected: nbdkit (often root) rewrites it every second through a
private temporary file created exclusively beside it, then renamed over it, so a symlink planted
at a predictable name (the old PATH.tmp) or at PATH itself makes it write nowhere else.  Checked
through a real nbdkit on a real qemu-storage-daemon; the start-up refusal of a directory nbdkit
cannot write is in test_plugin_e2e's BAD_CONFIGS.
"""
from __future__ import annotations

import json
import os
import stat

import pytest

from conftest import need_module
from vblk_core.errors import ConfigError
from vblk_plugin.stats import StatsWriter, check_path

nbd = need_module("nbd", "python3-libnbd")

MiB = 1 << 20
VICTIM = b"precious: nbdkit must never write here\n"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_symlinks_at_the_stats_paths_redirect_nothing(tmp_path, qsd_factory, nbdkit_factory):
    """Symlinks to two victim files planted at PATH.tmp and at PATH: after nbdkit has
    rewritten the stats file several times (and once more at exit), both victims are
    untouched, PATH is a regular file holding the counters as JSON, and no temporary file is
    left over."""
    stats_path = tmp_path / "stats.json"
    victims = {tmp_path / "victim-tmp": stats_path.with_name("stats.json.tmp"),
               tmp_path / "victim-path": stats_path}
    for victim, link in victims.items():
        victim.write_bytes(VICTIM)
        os.symlink(victim, link)
    before = {victim: os.stat(victim) for victim in victims}
    qsd = qsd_factory(num_queues=1, size=16 * MiB)
    kit = nbdkit_factory([f"socket={qsd.socket}"], stats=stats_path)
    h = kit.connect()
    h.pwrite(b"s" * 4096, 0)
    h.shutdown()
    inodes = set()

    def rewritten(st: dict) -> bool:
        inodes.add(os.stat(stats_path).st_ino)   # each rename brings a new inode
        return st["totals"]["requests"] >= 1 and len(inodes) >= 3

    st = kit.wait_stats(rewritten, timeout=15)
    assert st is not None and rewritten(st), f"stats rewritten {len(inodes)} times: {st}"
    assert kit.stop().status == 0, kit.log_text()       # and the final write at exit
    for victim, link in victims.items():
        assert victim.read_bytes() == VICTIM, f"{victim} (linked at {link.name}) was written"
        assert os.stat(victim).st_mtime_ns == before[victim].st_mtime_ns
    assert os.readlink(victims[tmp_path / "victim-tmp"]) == str(tmp_path / "victim-tmp")
    mode = os.lstat(stats_path).st_mode
    assert stat.S_ISREG(mode), "PATH is still a symlink: the stats went through it"
    assert stat.S_IMODE(mode) == 0o666 & ~_umask()       # as open(PATH, "w") made it
    with open(stats_path) as f:
        final = json.load(f)
    assert final["totals"]["requests"] >= 1 and final["totals"]["errors"] == 0, final
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")
                       and p.name != "stats.json.tmp")
    assert leftovers == [], leftovers


def test_a_failed_write_is_a_warning_and_leaves_nothing_behind(tmp_path):
    """The rename fails (PATH became a directory): warned, no temporary file left."""
    path = tmp_path / "stats.json"
    warnings: list[str] = []
    writer = StatsWriter(str(path), lambda: {"n": 1}, warnings.append)
    writer.write()
    assert json.loads(path.read_text()) == {"n": 1}
    path.unlink()
    path.mkdir()
    writer.write()
    assert len(warnings) == 1 and warnings[0].startswith(f"cannot write stats={path}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]


def test_check_path_refuses_what_cannot_be_written(tmp_path):
    check_path(str(tmp_path / "ok.json"))
    assert list(tmp_path.iterdir()) == []                 # the probe file is gone again
    with pytest.raises(ConfigError, match=r"^stats=/sys/vblk\.json: nbdkit cannot create files "
                       r"in /sys \(.+\): give stats= a path in a directory it can write$"):
        check_path("/sys/vblk.json")
    with pytest.raises(ConfigError, match=rf"^stats={tmp_path} is a directory: give the path of "
                       "a file"):
        check_path(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist: create it"):
        check_path(str(tmp_path / "no" / "s.json"))
