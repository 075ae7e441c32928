"""Several connections measured by wall clock, and a flag when they did not run at once.

fio reports each job's IOPS over that job's own runtime, and --group_reporting adds them up.
When a server takes one connection at a time (nbdkit's blkio plugin over a vhost-user daemon:
the daemon serves one front-end, so a second connection waits until the first has closed), four
jobs that ran one after another add up to four times what the server did.  So a workload with
several jobs (one NBD connection each) runs without --group_reporting, and is measured here as

    all jobs' I/O / the time in which at least one job was measuring (the union of the jobs'
    measured intervals: after each job's own ramp, until its end),

with the server CPU per request taken over that same time and divided by that same total.  The
overlap is the time in which every job was measuring at once, over that union: near 1 when the
connections ran in parallel, near 0 when they ran in turn; below OVERLAP_MIN the run is flagged.

Each job's measured interval comes from fio's JSON where fio has it (fio >= 3.36, Debian 13:
``job_start``, CLOCK_REALTIME ms at the end of the job's ramp, + ``job_runtime`` ms).  Older fio
(3.33, Debian 12) has neither a start nor an end time in its JSON (its averaged IOPS logs are
no help: an entry is written only for a window with completions, by a helper thread that may
sleep through a job's first windows), so the harness watches fio's job processes (one per job,
all forked at start; each exits right after its runtime) and dates a job's end by its exit,
to within the polling interval: its start is that end minus ``job_runtime``.
"""

import bisect
import json
import math
from dataclasses import dataclass

from . import procs

OVERLAP_MIN = 0.8   # below this the jobs mostly ran in turn: flagged
PERCENTILES = {"clat_p50_us": 50.0, "clat_p99_us": 99.0}


@dataclass(frozen=True)
class JobInterval:
    """One fio job's measured interval, wall-clock seconds (time.time()'s clock)."""
    start: float
    end: float
    source: str     # "job_start" (fio's JSON) or "exit" (the end from the job's process)


FIO_ARGS = ["--output-format=json+"]   # per-job results with full latency histograms


class JobExits:
    """fio's job processes (children of the fio process, in PID order = fio's job order) and
    when each exited: the midpoint between the last poll that saw it alive and the first that
    saw it gone or a zombie."""

    def __init__(self, fio_pid, numjobs):
        self.fio_pid = fio_pid
        self.numjobs = numjobs
        self.pids = []
        self.seen = {}      # pid -> time last seen alive
        self.ends = {}      # pid -> exit time

    def poll(self, now):
        """Look at the job processes at wall-clock time now (find them on the first calls)."""
        if len(self.pids) < self.numjobs:
            found = sorted(p for p in procs.tree_pids(self.fio_pid) if p != self.fio_pid)
            if len(found) >= self.numjobs:
                self.pids = found[:self.numjobs]
        for pid in self.pids:
            if pid in self.ends:
                continue
            if procs.exited(pid):
                self.ends[pid] = (self.seen.get(pid, now) + now) / 2
            else:
                self.seen[pid] = now

    def end_times(self):
        """Each job's exit time in fio's job order; None if they were not all seen to exit."""
        if len(self.pids) < self.numjobs or any(p not in self.ends for p in self.pids):
            return None
        return [self.ends[p] for p in self.pids]


def job_intervals(jobs, exits=None):
    """Each job's measured interval, from fio's JSON jobs, or for fio without ``job_start`` from
    their processes' exit times (JobExits.end_times()).  Raises ValueError when a job can be
    dated neither way."""
    out = []
    for i, job in enumerate(jobs):
        runtime = job["job_runtime"] / 1000.0
        if "job_start" in job:
            start = job["job_start"] / 1000.0
            out.append(JobInterval(start, start + runtime, "job_start"))
        elif exits is not None and i < len(exits):
            out.append(JobInterval(exits[i] - runtime, exits[i], "exit"))
        else:
            raise ValueError("fio job %d has no job_start and its process was not seen to "
                             "exit: cannot tell when it ran" % i)
    return out


def union(intervals):
    """The intervals merged into disjoint, sorted (start, end) segments."""
    segs = []
    for iv in sorted(intervals, key=lambda j: j.start):
        if segs and iv.start <= segs[-1][1]:
            segs[-1] = (segs[-1][0], max(segs[-1][1], iv.end))
        else:
            segs.append((iv.start, iv.end))
    return segs


def timing(intervals):
    """Active time (union of the intervals), span (first start to last end), the time every
    job was measuring at once, overlap = that / active time, and whether that is too low."""
    segs = union(intervals)
    active = sum(b - a for a, b in segs)
    together = max(0.0, min(j.end for j in intervals) - max(j.start for j in intervals))
    overlap = together / active if active > 0 else 0.0
    return {"jobs": len(intervals), "active_s": active,
            "span_s": max(j.end for j in intervals) - min(j.start for j in intervals),
            "all_jobs_s": together, "overlap": overlap, "overlapped": overlap >= OVERLAP_MIN,
            "segments": segs, "source": sorted({j.source for j in intervals}),
            "intervals": [(j.start, j.end) for j in intervals]}


def _percentile(bins, pct):
    """The pct-th percentile (ns) of a merged fio latency histogram {value_ns: count}."""
    total = sum(bins.values())
    if not total:
        return 0
    want = math.ceil(total * pct / 100.0)
    seen = 0
    for value in sorted(bins):
        seen += bins[value]
        if seen >= want:
            return value
    return max(bins)


def _merge_ddir(parts):
    """One direction's totals over all jobs (fio json+ per-job entries)."""
    ios = sum(p["total_ios"] for p in parts)
    bins = {}
    for p in parts:
        for value, count in (p.get("clat_ns", {}).get("bins") or {}).items():
            bins[int(value)] = bins.get(int(value), 0) + count
    out = {"total_ios": ios, "io_bytes": sum(p["io_bytes"] for p in parts),
           "fio_sum_iops": sum(p["iops"] for p in parts),
           "lat_mean_us": sum(p["lat_ns"]["mean"] * p["total_ios"] for p in parts)
           / ios / 1000 if ios else 0.0,
           "clat_max_us": max(p.get("clat_ns", {}).get("max", 0) for p in parts) / 1000}
    for key, pct in PERCENTILES.items():
        out[key] = _percentile(bins, pct) / 1000
    return out


def summarize(data, exits=None):
    """The run's result from fio's JSON object (per-job entries, no group_reporting): totals
    over all jobs, IOPS and bytes/s by wall clock, and the timing.  Raises ValueError or
    KeyError when the JSON lacks what is needed."""
    jobs = data["jobs"]
    if not jobs:
        raise ValueError("fio reported no jobs")
    iv = job_intervals(jobs, exits)
    t = timing(iv)
    active = t["active_s"]
    if active <= 0:
        raise ValueError("fio's jobs measured for no time")
    out = {"error": next((j["error"] for j in jobs if j.get("error")), 0),
           "runtime_ms": active * 1000,
           "fio_usr_cpu_pct": sum(j.get("usr_cpu", 0) for j in jobs) / len(jobs),
           "fio_sys_cpu_pct": sum(j.get("sys_cpu", 0) for j in jobs) / len(jobs),
           "timing": t}
    iops = bw = ios = fio_sum = 0.0
    for d in ("read", "write"):
        parts = [j[d] for j in jobs if j[d].get("total_ios")]
        if not parts:
            continue
        m = _merge_ddir(parts)
        m["iops"] = m["total_ios"] / active
        m["bw_bytes"] = m["io_bytes"] / active
        out[d] = m
        iops += m["iops"]
        bw += m["bw_bytes"]
        ios += m["total_ios"]
        fio_sum += m["fio_sum_iops"]
    out.update(iops=iops, bw_bytes=bw, total_ios=int(ios), fio_sum_iops=fio_sum)
    return out


def read_summary(json_path, exits=None):
    """summarize() of the fio JSON file at json_path (text before the object is ignored), with
    the job processes' exit times (if watched) kept beside it as a cross-check."""
    with open(json_path) as f:
        text = f.read()
    out = summarize(json.loads(text[text.index("{"):]), exits)
    if exits is not None:
        out["timing"]["exit_times"] = exits
    return out


def counter_over(samples, segments, value):
    """How much a counter grew during the segments: samples are (time, reading) in time order,
    readings linearly interpolated at the segment ends (clamped to the first and last sample).
    None if a reading needed is None (the process was gone) or there are no samples."""
    if not samples:
        return None
    times = [t for t, _ in samples]

    def at(t):
        i = bisect.bisect_left(times, t)
        if i <= 0:
            return value(samples[0][1])
        if i >= len(samples):
            return value(samples[-1][1])
        (t0, r0), (t1, r1) = samples[i - 1], samples[i]
        v0, v1 = value(r0), value(r1)
        if v0 is None or v1 is None:
            return None
        return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)

    total = 0.0
    for a, b in segments:
        va, vb = at(a), at(b)
        if va is None or vb is None:
            return None
        total += vb - va
    return total


def flag_text(t):
    """One-line warning for a run whose jobs did not overlap; "" when they did."""
    if not t or t["overlapped"]:
        return ""
    return ("connections did not run at once: overlap %.2f (all %d jobs measuring together "
            "%.1f s of %.1f s)" % (t["overlap"], t["jobs"], t["all_jobs_s"], t["active_s"]))

