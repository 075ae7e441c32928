"""placement=: parsing, and where the threads of a real nbdkit and its private daemon end up."""
from __future__ import annotations

import os

import psutil
import pytest

from vblk_core.errors import ConfigError
from vblk_plugin.config import PluginConfig
from vblk_plugin.placement import Placement, parse_cpu_list, resolve
from vblk_tools import harness

FOUR = frozenset({0, 1, 2, 3})


@pytest.mark.parametrize("value, want", [
    ("none", Placement(None, None)),
    ("split", Placement(frozenset({0, 1}), frozenset({2, 3}))),
    ("0/1", Placement(frozenset({0}), frozenset({1}))),
    ("0-1/2-3", Placement(frozenset({0, 1}), frozenset({2, 3}))),
    ("0,3/", Placement(frozenset({0, 3}), None)),
])
def test_resolve(value, want):
    assert resolve(value, FOUR) == want


def test_split_on_one_cpu_places_nothing():
    assert resolve("split", frozenset({5})) == Placement(None, None)


def test_split_uneven():
    assert resolve("split", frozenset({1, 2, 3})) == Placement(frozenset({1}), frozenset({2, 3}))


@pytest.mark.parametrize("bad, match", [
    ("", "not understood"), ("0", "not understood"), ("x/1", "not understood"),
    ("3-1/0", "not understood"), ("0/9", "CPU 9 .for daemon. is not one"),
    ("8/0", "CPU 8 .for nbdkit. is not one"),
])
def test_resolve_refuses(bad, match):
    with pytest.raises(ConfigError, match=match):
        resolve(bad, FOUR)


def test_parse_cpu_list():
    assert parse_cpu_list("0,2-4,7") == frozenset({0, 2, 3, 4, 7})


def test_default_is_split():
    assert PluginConfig().placement == resolve("split")


def _allowed(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets of the threads of ``pid``."""
    return {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}


def test_nbdkit_and_private_daemon_are_placed(tmp_path, nbdkit_factory):
    cpus = sorted(os.sched_getaffinity(0))
    mine, theirs = cpus[0], cpus[-1]
    image = harness.make_image(tmp_path / "disk.img", 16 << 20)
    kit = nbdkit_factory([f"image={image}", f"placement={mine}/{theirs}"], name="pl")
    h = kit.connect()    # a connection: nbdkit has started its worker threads
    try:
        assert h.get_size() == 16 << 20
        h.pwrite(b"p" * 4096, 0)
        assert _allowed(kit.pid) == {frozenset({mine})}
    finally:
        h.shutdown()
    daemons = [c for c in psutil.Process(kit.pid).children()
               if c.name().startswith("qemu-storage")]
    assert len(daemons) == 1
    assert _allowed(daemons[0].pid) == {frozenset({theirs})}


def test_nbdkit_refuses_a_bad_placement_before_listening(nbdkit_factory):
    kit = nbdkit_factory(["socket=/nonexistent", "placement=0/99999"], "bad", start=False)
    status, output = kit.expect_exit().status, kit.log_text()
    assert status == 1 and "placement=0/99999" in output and "Traceback" not in output
    assert not os.path.exists(kit.socket)
