#!/usr/bin/env python3
"""Benchmark the vblk_core driver alone (no nbdkit) against qemu-storage-daemon, with os.preadv /
os.pwritev on the same image file as the reference, in the same run.

    .venv/bin/python scripts/bench_core.py [--seconds 5] [--rounds 3] [--queues 4] [--aio threads]

Workloads: 4 KiB random read at depth 1 and 32, 1 MiB sequential read and write (depth 8).
Depth N = N threads each doing synchronous requests (the driver's API is synchronous, as
nbdkit's callbacks are).  Prints IOPS or MB/s and CPU per request (this process; and the
daemon's, from /proc/PID/stat), medians over rounds, engines interleaved.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

from vblk_core import BlockDevice, VhostUserConnector
from vblk_tools.harness import HarnessError, Qsd

TICK = os.sysconf("SC_CLK_TCK")
WORKLOADS = [("4k randread qd1", 4096, 1, "randread"), ("4k randread qd32", 4096, 32, "randread"),
             ("1M read qd8", 1 << 20, 8, "read"), ("1M write qd8", 1 << 20, 8, "write")]


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def run(engine, size: int, bs: int, depth: int, kind: str, seconds: float, qsd_pid: int):
    stop = threading.Event()
    counts = [0] * depth
    blocks = size // bs

    def worker(i: int) -> None:
        rng = random.Random(i)
        buf = bytearray(os.urandom(bs)) if kind == "write" else bytearray(bs)
        pos = i * (blocks // depth)
        n = 0
        while not stop.is_set():
            if kind == "randread":
                off = rng.randrange(blocks) * bs
            else:
                off = (pos % blocks) * bs
                pos += 1
            if kind == "write":
                engine.write(buf, off)
            else:
                engine.read(buf, off)
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    c0, d0, t0 = time.process_time(), proc_cpu(qsd_pid), time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    ops = sum(counts)
    return {"ops": ops / elapsed, "mbs": ops * bs / elapsed / 1e6,
            "cpu_us": (time.process_time() - c0) / max(ops, 1) * 1e6,
            "qsd_us": (proc_cpu(qsd_pid) - d0) / max(ops, 1) * 1e6}


class Preadv:
    name = "os.preadv"

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)

    def read(self, buf, off):
        os.preadv(self.fd, [buf], off)

    def write(self, buf, off):
        os.pwritev(self.fd, [buf], off)


class Driver:
    name = "vblk_core"

    def __init__(self, dev: BlockDevice) -> None:
        self.dev = dev

    def read(self, buf, off):
        self.dev.pread(buf, off)

    def write(self, buf, off):
        self.dev.pwrite(buf, off)


def report(dev: BlockDevice, engines: list, o: argparse.Namespace, size: int,
           qsd_pid: int) -> None:
    """Run every workload on every engine, rounds interleaved, and print the medians."""
    results: dict = {}
    for rnd in range(o.rounds):
        for wname, bs, depth, kind in WORKLOADS:
            for eng in engines:
                r = run(eng, size, bs, depth, kind, o.seconds, qsd_pid)
                results.setdefault((wname, eng.name), []).append(r)
                print(f"round {rnd + 1}/{o.rounds} {wname:17s} {eng.name:10s} "
                      f"{r['ops']:9.0f} ops/s {r['mbs']:8.1f} MB/s "
                      f"{r['cpu_us']:6.1f} us/req (+daemon {r['qsd_us']:5.1f})", flush=True)
    print(f"\n## vblk_core alone vs os.preadv — medians of {o.rounds} x {o.seconds:g}s, "
          f"{o.queues} queues, daemon aio={o.aio}\n")
    print("| workload | os.preadv | vblk_core | ratio | CPU us/req preadv | vblk (+daemon) |")
    print("|---|---|---|---|---|---|")
    for wname, bs, _d, _k in WORKLOADS:
        ref, drv = results[(wname, "os.preadv")], results[(wname, "vblk_core")]
        key = "ops" if bs == 4096 else "mbs"
        unit = "IOPS" if bs == 4096 else "MB/s"
        a = statistics.median(r[key] for r in ref)
        b = statistics.median(r[key] for r in drv)
        print(f"| {wname} | {a:,.0f} {unit} | {b:,.0f} {unit} | {b / a:.2f} | "
              f"{statistics.median(r['cpu_us'] for r in ref):.1f} | "
              f"{statistics.median(r['cpu_us'] for r in drv):.1f} "
              f"(+{statistics.median(r['qsd_us'] for r in drv):.1f}) |")
    print(f"\nstats: {dev.stats()['totals']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queues", type=int, default=4)
    ap.add_argument("--aio", choices=("threads", "io_uring"), default="threads")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="1 round of 1.5 s")
    o = ap.parse_args()
    if o.quick:
        o.seconds, o.rounds = 1.5, 1
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
        report(dev, [Preadv(image), Driver(dev)], o, size, qsd.pid)
    finally:
        if dev is not None:
            dev.close()
        qsd.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
