"""``vblk stats`` (plugin/vblk_plugin/statsview.py): rates from two snapshots, a restarted
nbdkit, a missing or half-written file, a stale one; and the live loop reading what the
plugin's real StatsWriter writes (renamed over the file every interval).  Against a running
nbdkit: tests/test_install_e2e.py."""
from __future__ import annotations

import io
import json
import os
import threading
import time

from vblk_plugin import cli
from vblk_plugin.stats import StatsWriter
from vblk_plugin.statsview import HEADER, StatsView, read_snapshot, watch


def snap(requests: list[int], nbytes: list[int], kicks: list[int], calls: list[int],
         errors: list[int] | None = None, in_flight: list[int] | None = None,
         reconnects: int = 0, state: str = "connected") -> dict:
    """A stats= file's content, as BlockDevice.stats() makes it."""
    errors = errors or [0] * len(requests)
    in_flight = in_flight or [0] * len(requests)
    queues = [{"index": i, "requests": requests[i], "bytes": nbytes[i], "errors": errors[i],
               "max_depth": 4, "in_flight": in_flight[i], "kicks": kicks[i], "calls": calls[i],
               "spin_hits": 0} for i in range(len(requests))]
    totals = {k: sum(q[k] for q in queues)
              for k in ("requests", "bytes", "errors", "kicks", "calls", "in_flight")}
    totals["max_depth"] = 4
    return {"queues": queues, "totals": totals, "state": state, "reconnects": reconnects,
            "failure": None, "bounce_buffers_in_use": 1, "bounce_buffers_high_water": 9}


def columns(line: str) -> list[str]:
    return line.split()


def test_rates_per_queue_and_in_total():
    view = StatsView()
    first = view.update(snap([100, 50], [10**6, 0], [90, 50], [100, 50]), 10.0)
    assert len(first) == 1 and "first report at its next write" in first[0]
    lines = view.update(snap([300, 150], [5 * 10**6, 10**6], [190, 150], [300, 100],
                             errors=[0, 2], in_flight=[3, 1]), 12.0)
    assert "state connected, reconnects 0" in lines[0]
    assert "bounce buffers in use 1 (high 9)" in lines[0]
    assert lines[1] == HEADER
    rows = {columns(line)[0]: columns(line)[1:] for line in lines[2:]}
    #              req/s    MB/s    depth max errors kicks/req calls/req
    assert rows["0"] == ["100.0", "2.00", "3", "4", "0", "0.50", "1.00"]
    assert rows["1"] == ["50.0", "0.50", "1", "4", "2", "1.00", "0.50"]
    assert rows["all"] == ["150.0", "2.50", "4", "4", "2", "0.67", "0.83"]


def test_an_idle_interval_has_no_per_request_ratios():
    view = StatsView()
    view.update(snap([5], [0], [5], [5]), 0.0)
    lines = view.update(snap([5], [0], [5], [5]), 1.0)
    assert columns(lines[2]) == ["0", "0.0", "0.00", "0", "4", "0", "-", "-"]


def test_an_unchanged_file_gives_no_report():
    view = StatsView()
    view.update(snap([5], [0], [5], [5]), 1.0)
    assert view.update(snap([5], [0], [5], [5]), 1.0) == []   # read again before a rewrite
    assert len(view.update(snap([9], [0], [9], [9]), 2.0)) == 4   # status, header, 0, all


def test_another_writer_means_a_new_nbdkit_even_if_counters_grew():
    view = StatsView()
    view.update(snap([100], [0], [100], [100]), 0.0, writer=1234)
    lines = view.update(snap([5000], [0], [5000], [5000]), 2.0, writer=5678)
    assert len(lines) == 1 and "counters restarted" in lines[0], lines
    assert "nbdkit pid 5678" in lines[0]
    # the write read with the new writer may have been the old one's last: the next is only
    # the new baseline, the one after is reported
    assert view.update(snap([10], [0], [10], [10]), 3.0, writer=5678) == []
    lines = view.update(snap([110], [0], [110], [110]), 4.0, writer=None)   # not seen now
    assert columns(lines[2])[:2] == ["0", "100.0"]


def test_counters_going_back_mean_a_new_nbdkit():
    view = StatsView()
    view.update(snap([1000], [0], [1000], [1000]), 0.0)
    lines = view.update(snap([10], [0], [10], [10]), 1.0)
    assert len(lines) == 1 and "counters restarted" in lines[0]
    lines = view.update(snap([30], [0], [20], [30]), 2.0)   # rates from the new baseline
    assert columns(lines[2])[:2] == ["0", "20.0"]
    lines = view.update(snap([30, 0], [0, 0], [20, 0], [30, 0]), 3.0)   # another queue count
    assert len(lines) == 1 and "counters restarted" in lines[0]


def test_problems_are_said_once_until_they_change(tmp_path):
    view = StatsView()
    path = str(tmp_path / "s.json")
    out = []
    for _ in range(3):
        s, written, problem = read_snapshot(path)
        out += view.update(s, written, problem)
    assert len(out) == 1 and "no such file yet" in out[0]
    with open(path, "w") as f:
        f.write('{"queues": [')
    s, _, problem = read_snapshot(path)
    assert s is None and "not JSON" in problem
    out = view.update(s, 0.0, problem)
    assert len(out) == 1 and "waiting: not JSON" in out[0]
    with open(path, "w") as f:
        json.dump({"something": "else"}, f)
    assert "not a vblk stats file" in read_snapshot(path)[2]


def test_a_stale_file_is_reported(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(snap([1], [0], [1], [1])))
    old = time.time() - 60
    os.utime(path, (old, old))
    out = io.StringIO()
    watch(str(path), 0.01, count=2, out=out)
    text = out.getvalue()
    assert "not rewritten for 60 s and no nbdkit with stats= naming it is running" in text
    assert text.count("waiting:") == 1


def test_watch_follows_the_real_writer(tmp_path):
    """The plugin's StatsWriter rewrites the file (tmp + rename) every 50 ms while counters
    move; every report after the first has rates, whatever write it caught."""
    path = str(tmp_path / "stats.json")
    requests = [0]
    lock = threading.Lock()

    def source() -> dict:
        with lock:
            requests[0] += 7
            n = requests[0]
        return snap([n, 2 * n], [4096 * n, 0], [n, n], [n, 2 * n])

    writer = StatsWriter(path, source, lambda msg: None, interval=0.05)
    writer.write()
    writer.start()
    try:
        out = io.StringIO()
        watch(path, 0.2, count=4, out=out)
    finally:
        writer.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(f"vblk stats {path}: every 0.2 s")
    assert "first report at its next write" in lines[1]
    reports = [i for i, line in enumerate(lines) if line == HEADER]
    assert len(reports) == 3, lines
    for i in reports:
        rows = {columns(line)[0]: columns(line) for line in lines[i + 1:i + 4]}
        assert set(rows) == {"0", "1", "all"}, lines
        assert float(rows["0"][1]) > 0 and float(rows["1"][1]) > float(rows["0"][1])
        assert rows["1"][6] == "0.50"        # kicks per request on queue 1


def test_bad_arguments_are_one_line(tmp_path, capsys):
    for args, expected in ((["--interval", "0"], "--interval 0: give 0.1 to 3600"),
                           (["--count", "0"], "--count 0: give 1 or more")):
        assert cli.main(["stats", str(tmp_path / "s.json"), *args]) == 1
        err = capsys.readouterr().err
        assert err.startswith("vblk stats: ") and expected in err, err
        assert err.count("\n") == 1
    assert cli.main(["stats", "/nonexistent-dir/s.json"]) == 1
    assert "directory /nonexistent-dir does not exist" in capsys.readouterr().err
