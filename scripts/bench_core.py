#!/usr/bin/env python3
"""The driver-only benchmark: vblk_core alone (Python threads calling BlockDevice, no nbdkit)
against a qemu-storage-daemon vhost-user-blk export, with os.preadv / os.pwritev on the same
image file as the reference, in the same run.

    .venv/bin/python scripts/bench_core.py [--seconds 5] [--rounds 3] [--queues 4] [--aio threads]
    .venv/bin/python scripts/bench_core.py --workloads 4k --seconds 1 --rounds 1   # smoke run

Workloads: 4 KiB random read and random write at depth 1 and 32, 1 MiB sequential read and
write at depth 8.  Depth N = N threads each doing synchronous requests (the driver's API is
synchronous, as nbdkit's callbacks are).  Per run: requests per second, CPU per request of this
process (user + system, all its threads: the workers and the driver) and of the daemon (from
/proc/PID/stat).  Medians over rounds, engines interleaved.  Prints a table and writes
benchmarks/results/<timestamp>-core[-quick][-LABEL].{md,json} (--out, --label).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from bench_lib.machine import environment
from vblk_core import BlockDevice, VhostUserConnector
from vblk_tools import ROOT
from vblk_tools.harness import HarnessError, Qsd

TICK = os.sysconf("SC_CLK_TCK")
TARGET_US = 12.0    # issue 17: driver CPU per 4 KiB read at depth 32


@dataclass(frozen=True)
class Workload:
    name: str
    bs: int
    depth: int
    kind: str       # randread | randwrite | read | write


WORKLOADS = [Workload("4k randread qd1", 4096, 1, "randread"),
             Workload("4k randread qd32", 4096, 32, "randread"),
             Workload("4k randwrite qd1", 4096, 1, "randwrite"),
             Workload("4k randwrite qd32", 4096, 32, "randwrite"),
             Workload("1M read qd8", 1 << 20, 8, "read"),
             Workload("1M write qd8", 1 << 20, 8, "write")]


class Engine(Protocol):
    name: str

    def read(self, buf: bytearray, off: int) -> None: ...

    def write(self, buf: bytearray, off: int) -> None: ...


def proc_cpu(pid: int) -> float:
    """utime + stime of process pid, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run(engine: Engine, size: int, w: Workload, seconds: float, qsd_pid: int) -> dict[str, float]:
    """w.depth threads doing w's requests on engine for seconds; rates and CPU per request."""
    stop = threading.Event()
    counts = [0] * w.depth
    blocks = size // w.bs
    writes = "write" in w.kind

    def worker(i: int) -> None:
        rng = random.Random(i)
        buf = bytearray(os.urandom(w.bs)) if writes else bytearray(w.bs)
        pos = i * (blocks // w.depth)
        n = 0
        while not stop.is_set():
            if w.kind.startswith("rand"):
                off = rng.randrange(blocks) * w.bs
            else:
                off = (pos % blocks) * w.bs
                pos += 1
            if writes:
                engine.write(buf, off)
            else:
                engine.read(buf, off)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(w.depth)]
    c0, d0, t0 = os.times(), proc_cpu(qsd_pid), time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    c1 = os.times()
    ops = max(sum(counts), 1)
    user, system = c1.user - c0.user, c1.system - c0.system
    return {"req_s": ops / elapsed, "mbs": ops * w.bs / elapsed / 1e6,
            "cpu_us": (user + system) / ops * 1e6, "user_us": user / ops * 1e6,
            "sys_us": system / ops * 1e6, "qsd_us": (proc_cpu(qsd_pid) - d0) / ops * 1e6}


class Preadv:
    name = "os.preadv"

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def read(self, buf: bytearray, off: int) -> None:
        os.preadv(self.fd, [buf], off)

    def write(self, buf: bytearray, off: int) -> None:
        os.pwritev(self.fd, [buf], off)


class Driver:
    name = "vblk_core"

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev

    def read(self, buf: bytearray, off: int) -> None:
        self.dev.pread(buf, off)

    def write(self, buf: bytearray, off: int) -> None:
        self.dev.pwrite(buf, off)


def measure(engines: list[Engine], wls: list[Workload], o: argparse.Namespace, size: int,
            qsd_pid: int) -> list[dict[str, Any]]:
    """Every workload on every engine, rounds interleaved; one dict per run."""
    runs = []
    for rnd in range(1, o.rounds + 1):
        for w in wls:
            for eng in engines:
                r = run(eng, size, w, o.seconds, qsd_pid)
                runs.append({"round": rnd, "workload": w.name, "engine": eng.name, **r})
                print(f"round {rnd}/{o.rounds} {w.name:17s} {eng.name:10s} "
                      f"{r['req_s']:9.0f} req/s {r['mbs']:8.1f} MB/s {r['cpu_us']:6.1f} "
                      f"us/req (+daemon {r['qsd_us']:5.1f})", flush=True)
    return runs


def table(runs: list[dict[str, Any]], wls: list[Workload], o: argparse.Namespace) -> str:
    """The markdown report: medians per workload, vblk_core beside os.preadv."""
    def med(wname: str, eng: str, key: str) -> float:
        return statistics.median(r[key] for r in runs
                                 if r["workload"] == wname and r["engine"] == eng)

    lines = [f"Medians of {o.rounds} x {o.seconds:g} s, {o.queues} queues, daemon aio={o.aio}. "
             "CPU = user + system of this process (workers + driver) per request; the daemon's "
             f"in parentheses. Target (issue 17): <= {TARGET_US:g} us of driver CPU per 4 KiB "
             "read at depth 32.", "",
             "| workload | os.preadv req/s | vblk_core req/s | ratio | CPU us/req preadv | "
             "CPU us/req vblk_core (user / sys) (+daemon) |", "|---|---|---|---|---|---|"]
    for w in wls:
        a, b = med(w.name, "os.preadv", "req_s"), med(w.name, "vblk_core", "req_s")
        mb = f" ({b * w.bs / 1e6:,.0f} MB/s)" if w.bs > 4096 else ""
        lines.append(
            f"| {w.name} | {a:,.0f} | {b:,.0f}{mb} | {b / a:.2f} | "
            f"{med(w.name, 'os.preadv', 'cpu_us'):.1f} | {med(w.name, 'vblk_core', 'cpu_us'):.1f}"
            f" ({med(w.name, 'vblk_core', 'user_us'):.1f} / "
            f"{med(w.name, 'vblk_core', 'sys_us'):.1f}) "
            f"(+{med(w.name, 'vblk_core', 'qsd_us'):.1f}) |")
    return "\n".join(lines)


def save(o: argparse.Namespace, meta: dict[str, Any], runs: list[dict[str, Any]],
         text: str) -> list[str]:
    """Write the report and the runs to --out; returns the paths written."""
    os.makedirs(o.out, exist_ok=True)
    base = os.path.join(o.out, meta["timestamp"] + "-core" + ("-quick" if o.quick else "")
                        + ("-" + o.label if o.label else ""))
    head = [f"# vblk_core alone (driver-only benchmark) {meta['timestamp']}", "",
            f"- command: `{meta['command']}`",
            f"- date: {meta['date']}; host: {meta['hostname']}, {meta['ncpu']} CPUs "
            f"({meta['cpu_model']}), kernel {meta['kernel']}, Python {meta['python']}",
            f"- git: {meta['git']}; {meta['versions']['qemu-storage-daemon']}",
            f"- stats: {meta.get('stats')}", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(head) + "\n" + text + "\n")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
        f.write("\n")
    return [base + ".md", base + ".json"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per run (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--queues", type=int, default=4, help="daemon and driver queues (default 4)")
    ap.add_argument("--aio", choices=("threads", "io_uring"), default="threads")
    ap.add_argument("--size-mib", type=int, default=1024, help="image size (default 1024)")
    ap.add_argument("--workloads", help="comma list of names or substrings (e.g. 4k,qd32)")
    ap.add_argument("--quick", action="store_true", help="1 round of 1.5 s")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                    help="results directory (default benchmarks/results)")
    ap.add_argument("--label", help="suffix for the result file names")
    o = ap.parse_args()
    if o.quick:
        o.seconds, o.rounds = 1.5, 1
    wanted = [t.strip() for t in (o.workloads or "").split(",") if t.strip()]
    wls = [w for w in WORKLOADS if not wanted or any(t in w.name for t in wanted)]
    if not wls:
        ap.error("no workload matches --workloads %s" % o.workloads)
    meta: dict[str, Any] = {
        "timestamp": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "command": " ".join(["scripts/bench_core.py"] + sys.argv[1:]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": o.seconds, "rounds": o.rounds, "queues": o.queues, "aio": o.aio,
        "size_mib": o.size_mib, "workloads": [w.name for w in wls], **environment()}
    tmp = tempfile.mkdtemp(prefix="vblk-bench-core-")
    image = os.path.join(tmp, "img")
    size = o.size_mib << 20
    with open(image, "wb") as f:  # real data, so reads are not of holes
        chunk = os.urandom(1 << 20)
        for _ in range(o.size_mib):
            f.write(chunk)
    qsd = Qsd(tmp, name="qsd", image=image, num_queues=o.queues, aio=o.aio)
    dev = None
    try:
        try:
            qsd.start()
        except HarnessError as e:
            print(f"bench_core: {e}", file=sys.stderr)
            return 1
        dev = BlockDevice.open(VhostUserConnector(qsd.socket), num_queues=o.queues,
                               reconnect_timeout=0)
        assert qsd.pid is not None
        runs = measure([Preadv(image), Driver(dev)], wls, o, size, qsd.pid)
        meta["stats"] = dev.stats()["totals"]
    finally:
        if dev is not None:
            dev.close()
        qsd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    text = table(runs, wls, o)
    print("\n" + text)
    paths = save(o, meta, runs, text)
    print("bench_core: wrote " + ", ".join(os.path.relpath(p, ROOT) if p.startswith(ROOT) else p
                                           for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
