"""fio workloads (nbd engine) and one measured run of a workload against a started server."""

import json
import subprocess
import time
from dataclasses import dataclass

from vblk_tools import harness

from . import procs, walltime


@dataclass
class Workload:
    name: str
    label: str         # short column heading
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    unit: str = "IOPS"  # headline metric: IOPS or MB/s

    def fio_args(self):
        return ["--rw=" + self.rw, "--bs=" + self.bs, "--iodepth=%d" % self.iodepth,
                "--numjobs=%d" % self.numjobs]

    @property
    def writes(self):
        return "write" in self.rw


WORKLOADS = [
    Workload("randread-4k-qd1", "4k randread QD1", "randread", "4k", 1),
    Workload("randread-4k-qd32", "4k randread QD32", "randread", "4k", 32),
    Workload("randwrite-4k-qd32", "4k randwrite QD32", "randwrite", "4k", 32),
    Workload("read-1m-qd8", "1M read QD8", "read", "1m", 8, unit="MB/s"),
    Workload("write-1m-qd8", "1M write QD8", "write", "1m", 8, unit="MB/s"),
    Workload("randread-4k-qd32-4conn", "4k randread 4conn×QD32", "randread", "4k", 32,
             numjobs=4),
]
BY_NAME = {w.name: w for w in WORKLOADS}


def select(text):
    if not text:
        return list(WORKLOADS)
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "all":
            group = list(WORKLOADS)
        elif item in BY_NAME:
            group = [BY_NAME[item]]
        else:
            # Convenience: a unique prefix or substring ("qd1", "4conn", "write-1m").
            group = [w for w in WORKLOADS if item in w.name]
            if not group:
                raise ValueError("unknown workload %r (known: %s)"
                                 % (item, ", ".join(BY_NAME)))
        out += [w for w in group if w not in out]
    return out


def fio_argv(w, uri, runtime, ramp, out_json, cpus=None):
    """fio's command line.  One job: --group_reporting, json.  Several jobs (one connection
    each): per-job results, timed by wall clock afterwards (walltime)."""
    pin = ["--cpus_allowed=" + cpus] if cpus else []
    if w.numjobs == 1:
        report = ["--group_reporting", "--output=" + out_json, "--output-format=json"]
    else:
        report = ["--output=" + out_json] + walltime.FIO_ARGS
    return ["fio"] + pin + ["--name=" + w.name, "--ioengine=nbd",
                            "--uri=" + uri] + w.fio_args() + [
        "--time_based", "--runtime=%dms" % round(runtime * 1000),
        "--ramp_time=%dms" % round(ramp * 1000),
        "--norandommap", "--randrepeat=0"] + report


def _summarize_fio(path):
    with open(path) as f:
        text = f.read()
    # --output gets only JSON, but be tolerant of anything printed before the object.
    data = json.loads(text[text.index("{"):])
    job = data["jobs"][0]
    out = {"error": job.get("error", 0), "runtime_ms": job.get("job_runtime"),
           "fio_usr_cpu_pct": job.get("usr_cpu"), "fio_sys_cpu_pct": job.get("sys_cpu")}
    iops = bw = ios = 0
    for d in ("read", "write"):
        s = job[d]
        if not s.get("total_ios"):
            continue
        iops += s["iops"]
        bw += s["bw_bytes"]
        ios += s["total_ios"]
        clat = s.get("clat_ns", {})
        pct = clat.get("percentile", {})
        out[d] = {"iops": s["iops"], "bw_bytes": s["bw_bytes"], "total_ios": s["total_ios"],
                  "io_bytes": s["io_bytes"], "lat_mean_us": s["lat_ns"]["mean"] / 1000,
                  "clat_p50_us": pct.get("50.000000", 0) / 1000,
                  "clat_p99_us": pct.get("99.000000", 0) / 1000,
                  "clat_max_us": clat.get("max", 0) / 1000}
    out.update(iops=iops, bw_bytes=bw, total_ios=ios)
    return out


def _snapshot(pids, fio_pids):
    busy, steal = procs.system_ticks()
    return {"t": time.monotonic(), "busy": busy, "steal": steal,
            "server": {r: procs.cpu_ticks(pid) for r, pid in pids.items()},
            "cswch": {r: procs.context_switches(pid) for r, pid in pids.items()},
            "fio": {p: procs.cpu_ticks(p) for p in fio_pids}}


def _reading(pids):
    """(wall-clock time, CPU ticks and context switches of each server process) now."""
    return (time.time(), {"ticks": {r: procs.cpu_ticks(pid) for r, pid in pids.items()},
                          "cswch": {r: procs.context_switches(pid) for r, pid in pids.items()}})


def _cpu_by_wall_clock(series, f, role):
    """A multi-job run: the server process's CPU and context switches over the jobs' active
    time (walltime), per request of the same total; {} if its readings are missing."""
    t = f["timing"]
    ticks = walltime.counter_over(series, t["segments"], lambda s: s["ticks"][role])
    if ticks is None or not f["total_ios"]:
        return {}
    out = {"ticks_window": ticks, "wall_window_s": t["active_s"],
           "cpu_util": ticks / procs.CLK_TCK / t["active_s"],
           "us_per_req": ticks / procs.CLK_TCK / f["total_ios"] * 1e6}
    cs = walltime.counter_over(series, t["segments"], lambda s: s["cswch"][role])
    if cs is not None:
        out["cswch_per_req"] = cs / f["total_ios"]
    return out


def measure(run, w, runtime, ramp, fio_json, fio_log, sample_interval=0.1):
    """Run fio workload w against the started server run; return a result dict.

    Server CPU: utime+stime ticks of each server process, read from /proc/PID/stat at the end of
    fio's ramp and just before its runtime ends; CPU seconds per wall second over that window,
    divided by fio's IOPS (which covers the same steady-state window), gives CPU per request.
    Several jobs (connections): IOPS are all jobs' I/O over the time the jobs were measuring
    (walltime), and the CPU is read every sample_interval and taken over that same time.
    Whole-run ticks (fio start to exit, including connect and ramp) are recorded too.
    Peak RSS: psutil RSS sampled every sample_interval, and VmHWM read at the end.
    """
    pids = run.pids()
    multi = w.numjobs > 1
    series = [_reading(pids)] if multi else []
    argv = fio_argv(w, run.uri, runtime, ramp, fio_json, run.spec.fio_cpus)
    first = {r: procs.cpu_ticks(pid) for r, pid in pids.items()}
    t0 = time.monotonic()
    fio = harness.spawn(argv, fio_log)
    exits = walltime.JobExits(fio.pid, w.numjobs) if multi else None
    win_start_at = t0 + ramp + 0.15           # fio's own start-up is inside its ramp
    win_end_at = t0 + ramp + runtime - 0.1
    # Jobs that a server takes one after another run for numjobs times as long.
    deadline = t0 + w.numjobs * (ramp + runtime) + 60.0
    win_a = win_b = None
    peak = {r: 0 for r in pids}
    threads = {r: 0 for r in pids}
    timed_out = False
    try:
        while fio.poll() is None:
            now = time.monotonic()
            for r, pid in pids.items():
                rss = procs.rss_kib(pid)
                if rss and rss > peak[r]:
                    peak[r] = rss
            if exits is not None:
                series.append(_reading(pids))
                exits.poll(time.time())
            if win_a is None and now >= win_start_at:
                fio_pids = procs.tree_pids(fio.pid)
                win_a = _snapshot(pids, fio_pids)
                threads = {r: procs.num_threads(pid) for r, pid in pids.items()}
            elif win_a is not None and win_b is None and now >= win_end_at:
                win_b = _snapshot(pids, fio_pids)
            if now > deadline:
                timed_out = True
                break
            next_at = now + sample_interval
            if win_a is None:
                next_at = min(next_at, win_start_at)
            elif win_b is None:
                next_at = min(next_at, win_end_at)
            try:
                fio.wait(max(0.0, next_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
    finally:
        harness.stop_process(fio, timeout=5.0)
    t_end = time.monotonic()
    if exits is not None:
        series.append(_reading(pids))
        exits.poll(time.time())
    last = {r: procs.cpu_ticks(pid) for r, pid in pids.items()}
    hwm = {r: procs.status_kib(pid, "VmHWM") for r, pid in pids.items()}

    res = {"server": run.spec.name, "workload": w.name, "fio_argv": argv, "ok": False,
           "wall_s": t_end - t0}
    dead = run.dead()
    if timed_out:
        res["error"] = "fio did not finish within numjobs * (runtime+ramp) + 60 s"
    elif fio.returncode != 0:
        res["error"] = "fio exited with status %s: %s" % (fio.returncode,
                                                          procs.log_tail(fio_log, 5))
    if dead:
        res["error"] = (res.get("error", "") + " server process(es) exited: %s" % dead).strip()
    if "error" in res:
        return res
    try:
        f = (walltime.read_summary(fio_json, exits.end_times()) if exits is not None
             else _summarize_fio(fio_json))
    except (OSError, ValueError, KeyError) as e:
        res["error"] = "cannot read fio output: %s" % e
        return res
    if f["error"]:
        res["error"] = "fio job error %s: %s" % (f["error"], procs.log_tail(fio_log, 5))
        return res
    res["fio"] = f
    note = walltime.flag_text(f.get("timing"))
    if note:
        res["flags"] = [note]
    res["iops"] = f["iops"]
    res["mbps"] = f["bw_bytes"] / 1e6
    res["value"] = res["mbps"] if w.unit == "MB/s" else res["iops"]

    cpu = {}
    for r in pids:
        c = {"ticks_total": None if None in (first[r], last[r]) else last[r] - first[r]}
        if multi:
            c.update(_cpu_by_wall_clock(series, f, r))
        elif win_a and win_b and win_a["server"][r] is not None and win_b["server"][r] is not None:
            ticks = win_b["server"][r] - win_a["server"][r]
            wall = win_b["t"] - win_a["t"]
            util = ticks / procs.CLK_TCK / wall
            c.update(ticks_window=ticks, wall_window_s=wall, cpu_util=util,
                     us_per_req=util / f["iops"] * 1e6 if f["iops"] else None)
            cs_a, cs_b = win_a["cswch"][r], win_b["cswch"][r]
            if cs_a is not None and cs_b is not None and f["iops"]:
                c["cswch_per_req"] = (cs_b - cs_a) / wall / f["iops"]
        if "us_per_req" not in c:
            # fio finished early: fall back to whole-run ticks over fio's completed I/Os
            if c["ticks_total"] is not None and f["total_ios"]:
                c["us_per_req"] = c["ticks_total"] / procs.CLK_TCK / f["total_ios"] * 1e6
                c["approx"] = True
        c["threads"] = threads.get(r)
        cpu[r] = c
    res["cpu"] = cpu
    if win_a and win_b:
        # What else used the machine during the window: everything busy on it, minus the
        # server processes and fio (with its job processes).  A noisy-neighbour indicator.
        wall = win_b["t"] - win_a["t"]
        hz = procs.CLK_TCK * wall
        busy = win_b["busy"] - win_a["busy"]
        server = sum(cpu[r].get("ticks_window") or 0 for r in cpu)
        fio_t = sum((win_b["fio"].get(p) or 0) - (win_a["fio"].get(p) or 0)
                    for p in win_a["fio"] if win_a["fio"][p] is not None)
        res["machine"] = {"busy_cpus": busy / hz, "server_cpus": server / hz,
                          "fio_cpus": fio_t / hz,
                          "other_cpus": max(0.0, busy - server - fio_t) / hz,
                          "steal_cpus": (win_b["steal"] - win_a["steal"]) / hz}
    res["rss_kib"] = {r: {"sampled_peak": peak[r] or None, "vmhwm": hwm[r]} for r in pids}
    res["ok"] = True
    return res
