"""spin=: the plugin hands the bounded used-ring spin to the driver (default 50 µs); a request
alone on the device then finds its completion without sleeping (the stats count it)."""
from __future__ import annotations

import pytest

from vblk_core.errors import ConfigError
from vblk_plugin.config import PluginConfig
from vblk_tools import harness


def test_spin_key():
    c = PluginConfig()
    assert c.spin_us == 50
    c.set("spin", "0")
    assert c.spin_us == 0
    with pytest.raises(ConfigError, match="spin=20000 is out of range"):
        PluginConfig().set("spin", "20000")


@pytest.mark.parametrize("spin, hits", [("5000", True), ("0", False)])
def test_spin_reaches_the_driver(tmp_path, nbdkit_factory, spin, hits):
    image = harness.make_image(tmp_path / "disk.img", 8 << 20)
    kit = nbdkit_factory([f"image={image}", f"spin={spin}"], name="spin", stats=True)
    h = kit.connect()
    try:
        for i in range(50):              # one at a time: each request is alone
            h.pread(4096, i * 4096)
    finally:
        h.shutdown()
    stats = kit.wait_stats(lambda s: s["totals"]["requests"] >= 50)
    assert stats is not None
    spun = sum(q["spin_hits"] for q in stats["queues"])
    assert (spun > 0) == hits, stats
