"""callers=: the admission limit lets at most N callers in, and every caller through."""
from __future__ import annotations

import threading
import time

import pytest

from vblk_core.errors import ConfigError
from vblk_plugin.admission import DEFAULT_CALLERS, Admission
from vblk_plugin.config import PluginConfig


@pytest.mark.parametrize("limit", [1, 3])
def test_at_most_limit_inside(limit):
    gate = Admission(limit)
    inside = peak = done = 0
    lock = threading.Lock()

    def caller() -> None:
        nonlocal inside, peak, done
        for _ in range(20):
            with gate:
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                time.sleep(0.001)   # let the others pile up at the gate
                with lock:
                    inside -= 1
        with lock:
            done += 1

    threads = [threading.Thread(target=caller) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done == 8 and inside == 0
    assert peak == limit


def test_a_failing_caller_gives_its_place_back():
    gate = Admission(1)
    with pytest.raises(RuntimeError):
        with gate:
            raise RuntimeError("device error")
    entered = threading.Event()

    def caller() -> None:
        with gate:
            entered.set()
    t = threading.Thread(target=caller)
    t.start()
    assert entered.wait(5), "the place was not given back"
    t.join()


def test_zero_means_no_limit():
    gate = Admission(0)
    with gate, gate, gate:   # re-entering from one thread would block with a limit
        pass


def test_config_key():
    c = PluginConfig()
    assert c.callers == DEFAULT_CALLERS
    c.set("callers", "0")
    assert c.callers == 0
    with pytest.raises(ConfigError, match="callers=2000 is out of range"):
        PluginConfig().set("callers", "2000")
