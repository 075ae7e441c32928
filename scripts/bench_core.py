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
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vblk_core import BlockDevice  # noqa: E402

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
    image, sock = os.path.join(tmp, "img"), os.path.join(tmp, "vhost.sock")
    size = o.size_mib << 20
    with open(image, "wb") as f:  # real data, so reads are not of holes
        chunk = os.urandom(1 << 20)
        for _ in range(o.size_mib):
            f.write(chunk)
    aio = "" if o.aio == "threads" else ",aio=io_uring"
    qsd = subprocess.Popen([
        "qemu-storage-daemon", "--blockdev",
        f"driver=file,node-name=file0,filename={image}{aio}",
        "--blockdev", "driver=raw,node-name=raw0,file=file0",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues={o.queues}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dev = None
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or qsd.poll() is not None:
                print("qemu-storage-daemon did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        time.sleep(0.2)
        dev = BlockDevice(sock, num_queues=o.queues, reconnect_timeout=0)
        engines = [Preadv(image), Driver(dev)]
        results: dict = {}
        for rnd in range(o.rounds):
            for wname, bs, depth, kind in WORKLOADS:
                for eng in engines:
                    r = run(eng, size, bs, depth, kind, o.seconds, qsd.pid)
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
    finally:
        if dev is not None:
            dev.close()
        qsd.terminate()
        try:
            qsd.wait(10)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait()
        for name in ("img", "vhost.sock"):
            try:
                os.unlink(os.path.join(tmp, name))
            except OSError:
                pass
        os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
