"""The benchmark's multi-connection timing (scripts/bench_lib/walltime.py): several fio jobs are
measured by wall clock, and a run whose jobs did not overlap is flagged.

fio sums per-job IOPS, each over the job's own runtime: nbdkit's blkio plugin took four
connections one after another and was reported at four times its rate.  The canned fio JSON
below is what fio 3.39 (``job_start``) and fio 3.33 (no start time: the job processes' exit
times) report for such runs; the last test runs fio against a real nbdkit that takes one
connection at a time (nbdkit's noparallel filter) and against one that takes them at once.
"""
from __future__ import annotations

import os

import pytest

from bench_lib import report, servers, walltime, workloads
from bench_lib.walltime import JobInterval

T0 = 1_796_400_000.0    # a wall-clock second (CLOCK_REALTIME), as fio's job_start is


def _job(start: float | None, runtime_s: float, iops: float, lat_ns: dict[int, int]) -> dict:
    """One fio json+ job entry (the fields the harness reads): a 4 KiB random-read job that did
    iops requests per second of its own runtime; its latency histogram is lat_ns scaled up."""
    ios = round(iops * runtime_s)
    scale = ios / sum(lat_ns.values())
    bins = {str(v): round(c * scale) for v, c in lat_ns.items()}
    read = {"io_bytes": ios * 4096, "bw_bytes": iops * 4096, "iops": iops,
            "runtime": round(runtime_s * 1000), "total_ios": ios, "short_ios": 0,
            "lat_ns": {"mean": sum(v * c for v, c in lat_ns.items()) / sum(lat_ns.values())},
            "clat_ns": {"max": max(lat_ns), "bins": bins}}
    job = {"jobname": "randread-4k-qd32-4conn", "groupid": 0, "error": 0,
           "job_runtime": round(runtime_s * 1000), "usr_cpu": 20.0, "sys_cpu": 30.0,
           "read": read, "write": {"io_bytes": 0, "iops": 0.0, "total_ios": 0}}
    if start is not None:
        job["job_start"] = round(start * 1000)
    return job


LAT = {100_000: 50, 200_000: 49, 900_000: 1}


def _fio(starts: list[float | None]) -> dict:
    return {"fio version": "fio-3.39", "jobs": [_job(s, 3.0, 11_500, LAT) for s in starts]}


def test_four_jobs_in_turn_give_a_quarter_of_fio_sum_and_are_flagged():
    # Four 3-second jobs, each after the previous one's end plus a 1 s ramp: what fio reported
    # as 46k IOPS for a server doing 11.5k.
    f = walltime.summarize(_fio([T0 + 4.0 * i for i in range(4)]))
    assert f["fio_sum_iops"] == pytest.approx(46_000)
    assert f["iops"] == pytest.approx(11_500, rel=0.01)
    assert f["total_ios"] == 4 * 34_500
    t = f["timing"]
    assert t["active_s"] == pytest.approx(12.0) and t["span_s"] == pytest.approx(15.0)
    assert t["overlap"] == 0.0 and not t["overlapped"] and t["source"] == ["job_start"]
    assert "did not run at once" in walltime.flag_text(t)


def test_four_jobs_at_once_give_fio_sum_and_are_not_flagged():
    f = walltime.summarize(_fio([T0 + 0.01 * i for i in range(4)]))   # connects 10 ms apart
    assert f["iops"] == pytest.approx(46_000, rel=0.02)
    assert f["timing"]["overlap"] == pytest.approx(2.97 / 3.03)
    assert f["timing"]["overlapped"] and walltime.flag_text(f["timing"]) == ""


def test_half_overlapping_jobs_are_flagged():
    f = walltime.summarize(_fio([T0, T0, T0 + 1.5, T0 + 1.5]))
    assert f["timing"]["active_s"] == pytest.approx(4.5)
    assert f["timing"]["overlap"] == pytest.approx(1.5 / 4.5)
    assert not f["timing"]["overlapped"]


def test_old_fio_jobs_dated_by_their_processes_exit():
    # fio 3.33 has no job_start: the end is when the job's process exited.
    data = _fio([None] * 4)
    with pytest.raises(ValueError, match="cannot tell when it ran"):
        walltime.summarize(data)
    exits = [T0 + 3.0 + 4.0 * i for i in range(4)]
    f = walltime.summarize(data, exits)
    assert f["iops"] == pytest.approx(11_500, rel=0.01)
    assert f["timing"]["source"] == ["exit"] and not f["timing"]["overlapped"]
    assert walltime.job_intervals(data["jobs"], exits)[1] == JobInterval(T0 + 4.0, T0 + 7.0,
                                                                         "exit")


def test_latency_percentiles_of_all_jobs_together():
    slow = _job(T0, 3.0, 1000, {1_000_000: 1})            # 3000 requests at 1 ms
    fast = _job(T0, 3.0, 9000, {100_000: 1})               # 27000 at 100 µs
    f = walltime.summarize({"jobs": [slow, fast]})
    assert f["read"]["clat_p50_us"] == 100 and f["read"]["clat_p99_us"] == 1000
    assert f["read"]["lat_mean_us"] == pytest.approx(0.1 * 1000 + 0.9 * 100)
    assert f["read"]["clat_max_us"] == 1000


def test_counter_over_interpolates_within_the_segments():
    samples = [(0.0, {"t": 0}), (1.0, {"t": 100}), (2.0, {"t": 100}), (3.0, {"t": 400})]
    segs = [(0.5, 1.5), (2.5, 3.0)]
    assert walltime.counter_over(samples, segs, lambda r: r["t"]) == pytest.approx(50 + 150)
    assert walltime.counter_over(samples, [(-5.0, 9.0)], lambda r: r["t"]) == 400  # clamped
    gone = samples[:2] + [(2.0, {"t": None})]
    assert walltime.counter_over(gone, [(1.2, 1.8)], lambda r: r["t"]) is None


def _measure(tmp_path, name: str, image: str) -> dict:
    opts = type("Opts", (), {"plugin": servers.DEFAULT_VBLK_PLUGIN, "vblk_env": [],
                             "vblk_arg": [], "vblk_threads": None, "vblk_queues": 1,
                             "vblk_stats": False, "vblk_variant": [], "floor_threads": None,
                             "file_threads": None})()
    spec = servers.catalogue(opts)[name]
    w = workloads.Workload("randread-4k-qd4-2conn", "4k randread 2conn×QD4", "randread", "4k",
                           4, numjobs=2)
    run = servers.start(spec, image, str(tmp_path), str(tmp_path), name, timeout=20)
    try:
        res = workloads.measure(run, w, 0.6, 0.2, str(tmp_path / f"{name}.json"),
                                str(tmp_path / f"{name}.fio.log"))
    finally:
        run.stop()
    assert res["ok"], res.get("error")
    res["round"] = 1
    return res


def test_real_server_taking_one_connection_at_a_time_is_flagged(tmp_path):
    image = str(tmp_path / "img")
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    serial = _measure(tmp_path, "memory-serial", image)
    parallel = _measure(tmp_path, "memory", image)
    t = serial["fio"]["timing"]
    assert not t["overlapped"] and t["overlap"] < 0.2, t
    assert t["active_s"] > 1.1, t          # two 0.6 s jobs, one after the other
    # wall clock: about half what fio's per-job IOPS add up to
    assert serial["value"] == pytest.approx(serial["fio"]["fio_sum_iops"] / 2, rel=0.15)
    assert serial["flags"] and serial["cpu"]["nbdkit"]["us_per_req"] > 0
    # its CPU per request is taken over the same time as its throughput
    assert serial["cpu"]["nbdkit"]["wall_window_s"] == pytest.approx(t["active_s"])
    assert parallel["fio"]["timing"]["overlapped"] and "flags" not in parallel
    assert parallel["value"] == pytest.approx(parallel["fio"]["fio_sum_iops"], rel=0.15)

    w = workloads.Workload("randread-4k-qd4-2conn", "4k 2conn", "randread", "4k", 4, numjobs=2)
    summary = report.aggregate([serial, parallel], ["memory-serial", "memory"], [w])
    assert summary["memory-serial"][w.name]["not_overlapped"] == 1
    assert summary["memory"][w.name]["not_overlapped"] == 0
    meta = {"timestamp": "t", "quick": True, "command": "c", "date": "d", "hostname": "h",
            "ncpu": os.cpu_count(), "cpu_model": "m", "kernel": "k", "git": "g", "versions": {},
            "image": image, "image_size": 16 << 20, "runtime": 0.6, "ramp": 0.2, "rounds": 1,
            "server_specs": {"memory-serial": {"context": True}}, "server_argv": {}}
    md = report.markdown(meta, summary, ["memory-serial", "memory"], [w], {}, [serial, parallel])
    rows: dict[str, str] = {}       # the first table: throughput
    for line in md.splitlines():
        if line.startswith("| `"):
            rows.setdefault(line.split(" | ")[0], line)
    assert "⚠" in rows["| `memory-serial` (context)"] and "⚠" not in rows["| `memory`"]
    assert "connections did not run at once" in md
