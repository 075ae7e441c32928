"""What the transport guest runs (tests/vm/transport_init chroots into the host's root and starts
``python3 transport_checks.py /tmp/share``), and the data model the host checks the image with.

The share holds ``plan.json`` (written by the test on the host) and receives ``results.json``,
``bench.md``, ``out.img`` (nbdcopy's copy of the whole export) and the logs.  A plan names a
scenario:

``vdpa``  a virtio-blk disk of the guest (the test's image, found by its serial) is exported by
          qemu-storage-daemon as VDUSE (vduse-blk) and as vhost-user-blk; ``vdpa dev add`` binds
          the VDUSE device to vhost_vdpa -> /dev/vhost-vdpa-N; nbdkit serves it with
          ``vdpa=/dev/vhost-vdpa-N``.
``vfio``  the test's image is a virtio-blk-pci device behind the guest's intel-iommu; it is
          unbound from virtio-pci and bound to vfio-pci; nbdkit serves it with ``pci=ADDR``.
          Optionally a second disk behind qemu-storage-daemon for the driver-only comparison.
``script`` for investigations by hand: ``run(plan, procs, share, res)`` from plan["script"]
          (a path the guest sees, e.g. /tmp/share/x.py).

``vblk info`` on the vDPA device first (``vblk_info_check``).  Then the same client checks
(``nbd_checks``): libnbd from several connections at once, nbdcopy
in and out, flush/trim/zero, the stats file; vblk_core alone with every used ring wrapping
twice (``ring_wrap_check``, data checked); and a driver-only measurement (``driver_bench``).
The host verifies the image byte for byte against ``expected_image(plan)`` after QEMU has
exited.  Standard library, libnbd's Python binding and vblk_core only.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PLUGIN = os.path.join(REPO, "plugin", "plugin.py")
MiB = 1 << 20
KiB = 1 << 10
RESULT = "VBLK-GUEST-RESULT:"
VDUSE_SERIAL = "vblk-vduse"   # the VDUSE export's serial (GET_ID), as vblk info must report it

# --------------------------------------------------------------------------- the data model
# (imported by the host tests too: keep it free of guest-only imports)

IMAGE_SIZE = 64 * MiB
REGIONS = {                      # name: (offset, length)
    "copy_in": (0, 16 * MiB),     # nbdcopy from share/src.bin
    "parallel": (16 * MiB, 32 * MiB),   # several connections and threads at once
    "zero_trim": (48 * MiB, 8 * MiB),   # pattern, then trims and zeroes (below)
    "fua": (56 * MiB, 4 * MiB),   # FUA writes read back on another connection
    "tail": (IMAGE_SIZE - 64 * KiB, 64 * KiB),   # the device's last bytes
}
# Inside zero_trim (offsets from its start): (kind, offset, length)
HOLES = [("trim", 1 * MiB, 2 * MiB), ("zero_nohole", 4 * MiB, 1 * MiB),
         ("zero", 5 * MiB + 4 * KiB, 256 * KiB), ("zero_fast", 6 * MiB, 512 * KiB)]
# request sizes the parallel writers cycle through (all multiples of 4 KiB)
CHUNKS = [4 * KiB, 64 * KiB, 1 * MiB, 12 * KiB, 256 * KiB, 8 * KiB, 2 * MiB, 128 * KiB]
CONNECTIONS = 4
THREADS_PER_CONNECTION = 2


def region_data(seed: str, name: str, length: int) -> bytes:
    """The content written to a region: deterministic in (seed, name)."""
    return random.Random(f"{seed}:{name}").randbytes(length)


def source_file_data(seed: str) -> bytes:
    """share/src.bin, the file nbdcopy copies in (written by the host)."""
    return region_data(seed, "src.bin", REGIONS["copy_in"][1])


def expected_image(seed: str, fast_zero_done: bool = True) -> bytearray:
    """The whole image after a successful nbd_checks run."""
    img = bytearray(IMAGE_SIZE)
    for name, (off, length) in REGIONS.items():
        data = source_file_data(seed) if name == "copy_in" else region_data(seed, name, length)
        img[off:off + length] = data
    base = REGIONS["zero_trim"][0]
    for kind, off, length in HOLES:
        if kind != "zero_fast" or fast_zero_done:
            img[base + off:base + off + length] = bytes(length)
    return img


def chunk_plan(offset: int, length: int) -> list[tuple[int, int]]:
    out, pos, i = [], offset, 0
    while pos < offset + length:
        n = min(CHUNKS[i % len(CHUNKS)], offset + length - pos)
        out.append((pos, n))
        pos += n
        i += 1
    return out


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Index of the first differing byte (len of the shorter if one is a prefix), -1 if equal."""
    if a == b:
        return -1
    n = min(len(a), len(b))
    step = 64 * KiB
    for off in range(0, n, step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, n)):
                if a[i] != b[i]:
                    return i
    return n


def describe_difference(got: bytes | bytearray, want: bytes | bytearray) -> str | None:
    off = first_difference(got, want)
    if off < 0:
        return None
    where = [name for name, (o, n) in REGIONS.items() if o <= off < o + n] or ["unwritten"]
    bad = sum(1 for o in range(0, min(len(got), len(want)), 4096)
              if got[o:o + 4096] != want[o:o + 4096])
    return (f"{len(got)} bytes vs {len(want)} expected; first difference at byte {off} "
            f"(region {where[0]}), {bad} differing 4 KiB blocks; got {bytes(got[off:off + 16])!r}"
            f" want {bytes(want[off:off + 16])!r}")


def verify_image(path: str, seed: str, fast_zero_done: bool) -> str | None:
    """Host side: the file at path against expected_image; None if equal, else what differs."""
    with open(path, "rb") as f:
        got = f.read()
    return describe_difference(got, expected_image(seed, fast_zero_done))


def hole_report(path: str) -> dict[str, bool]:
    """Host side: for each trimmed/zeroed range of the image, whether the file has no data
    there (a hole: the trim or zero reached the host file as a deallocation)."""
    base = REGIONS["zero_trim"][0]
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for kind, off, length in HOLES:
            try:
                data = os.lseek(fd, base + off, os.SEEK_DATA)
            except OSError:
                data = IMAGE_SIZE
            out[kind] = data >= base + off + length
    finally:
        os.close(fd)
    return out


def filesystem_makes_holes(directory: str) -> bool:
    """Host side: whether files in directory can have holes punched (then seen by SEEK_DATA)."""
    import ctypes
    import tempfile
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        f.write(b"x" * (2 * MiB))
        f.flush()
        if libc.fallocate(f.fileno(), 0x01 | 0x02, 0, 1 * MiB) != 0:   # KEEP_SIZE|PUNCH_HOLE
            return False
        try:
            return os.lseek(f.fileno(), 0, os.SEEK_DATA) >= 1 * MiB
        except OSError:
            return False


# --------------------------------------------------------------------------- guest helpers

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"vblk-guest-run [{time.monotonic() - T0:6.2f}] {msg}", flush=True)


class CheckFailed(Exception):
    pass


def check(cond: object, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


class Procs:
    """Processes started here, stopped by PID at the end (SIGTERM, then SIGKILL)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log(f"start {name}: {' '.join(cmd)}")
        with open(os.path.join(self.logdir, f"{name}.log"), "wb") as f:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        self.procs.append((name, p))
        return p

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            with open(os.path.join(self.logdir, f"{name}.log"), errors="replace") as f:
                return "\n".join(f.read().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, p: subprocess.Popen, timeout: float = 20) -> int:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def stop_all(self) -> None:
        for _, p in reversed(self.procs):
            self.stop(p)


def wait_until(cond: Callable[[], object], what: str, timeout: float,
               proc: subprocess.Popen | None = None, procs: Procs | None = None,
               name: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise CheckFailed(f"{name} exited with {proc.returncode} before {what}:\n"
                              f"{procs.tail(name) if procs else ''}")
        if time.monotonic() > deadline:
            raise CheckFailed(f"no {what} after {timeout}s\n{procs.tail(name) if procs else ''}")
        time.sleep(0.05)


def sh(cmd: list[str], timeout: float = 60) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def write_sysfs(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def disk_by_serial(serial: str) -> str:
    for path in glob.glob("/sys/block/vd*/serial"):
        with open(path) as f:
            if f.read().strip() == serial:
                return "/dev/" + path.split("/")[3]
    raise CheckFailed(f"no virtio disk with serial {serial} in the guest")


# --------------------------------------------------------------------------- back-ends

class Qsd:
    """qemu-storage-daemon on a guest disk: a VDUSE export (vduse0) bound to vhost_vdpa, and a
    vhost-user-blk export of the same node (for the driver-only comparison)."""

    def __init__(self, procs: Procs, disk: str, queues: int, vhost_socket: str) -> None:
        self.procs = procs
        self.vhost_socket = vhost_socket
        self.vdpa_added = False
        self.proc = procs.start("qemu-storage-daemon", [
            "qemu-storage-daemon",
            "--blockdev", f"driver=host_device,node-name=file0,filename={disk},"
                          "cache.direct=on,aio=native,discard=unmap",
            "--blockdev", "driver=raw,node-name=raw0,file=file0,discard=unmap",
            "--export", f"type=vduse-blk,id=v0,node-name=raw0,name=vduse0,serial={VDUSE_SERIAL},"
                        f"num-queues={queues},queue-size=256,writable=on",
            "--export", "type=vhost-user-blk,id=u0,node-name=raw0,addr.type=unix,"
                        f"addr.path={vhost_socket},writable=on,num-queues={queues}",
        ])
        wait_until(lambda: os.path.exists("/dev/vduse/vduse0") and os.path.exists(vhost_socket),
                   "/dev/vduse/vduse0 and the vhost-user socket", 30, self.proc, procs,
                   "qemu-storage-daemon")
        t = time.monotonic()
        sh(["vdpa", "dev", "add", "name", "vduse0", "mgmtdev", "vduse"])
        self.vdpa_added = True
        self.vhost_vdpa = ""

        def found() -> bool:
            nodes = glob.glob("/sys/bus/vdpa/devices/vduse0/vhost-vdpa-*")
            if nodes:
                self.vhost_vdpa = "/dev/" + os.path.basename(nodes[0])
            return bool(nodes) and os.path.exists(self.vhost_vdpa)
        wait_until(found, "/dev/vhost-vdpa-N for vduse0", 20)
        driver = os.path.basename(os.readlink("/sys/bus/vdpa/devices/vduse0/driver"))
        check(driver == "vhost_vdpa", f"vduse0 is bound to {driver}, not vhost_vdpa")
        log(f"vdpa dev add: {self.vhost_vdpa} (driver {driver}) in "
            f"{time.monotonic() - t:.2f}s")

    def stop(self) -> None:
        if self.vdpa_added:   # the VDUSE device cannot be destroyed while on the vdpa bus
            self.vdpa_added = False
            sh(["vdpa", "dev", "del", "vduse0"])
        rc = self.procs.stop(self.proc)
        check(rc == 0, f"qemu-storage-daemon exited with {rc}:\n"
              f"{self.procs.tail('qemu-storage-daemon')}")


def bind_vfio(addr: str) -> str:
    """Unbind the PCI function ``addr`` from its driver, bind it to vfio-pci; its /dev/vfio/N."""
    dev = f"/sys/bus/pci/devices/{addr}"
    check(os.path.isdir(dev), f"no PCI device {addr} in the guest")
    ids = [open(f"{dev}/{k}").read().strip() for k in ("vendor", "device")]
    check(ids == ["0x1af4", "0x1042"], f"{addr} is {ids}, not a modern virtio-blk (1af4:1042)")
    if os.path.exists(f"{dev}/driver"):
        old = os.path.basename(os.readlink(f"{dev}/driver"))
        write_sysfs(f"{dev}/driver/unbind", addr)
        log(f"{addr}: unbound from {old}")
    write_sysfs(f"{dev}/driver_override", "vfio-pci")
    write_sysfs("/sys/bus/pci/drivers_probe", addr)
    check(os.path.exists(f"{dev}/driver") and
          os.path.basename(os.readlink(f"{dev}/driver")) == "vfio-pci",
          f"{addr} did not bind to vfio-pci")
    group = os.path.basename(os.readlink(f"{dev}/iommu_group"))
    members = os.listdir(f"{dev}/iommu_group/devices")
    check(os.path.exists(f"/dev/vfio/{group}"), f"no /dev/vfio/{group}")
    log(f"{addr}: bound to vfio-pci, IOMMU group {group} ({' '.join(members)})")
    return f"/dev/vfio/{group}"


# --------------------------------------------------------------------------- NBD checks

def nbd_checks(uri: str, seed: str, share: str, res: dict[str, Any]) -> None:
    """Real clients against the export at ``uri``; everything is checked in the guest too."""
    import nbd
    handles = []
    for _ in range(CONNECTIONS):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    h0 = handles[0]
    info = {"size": h0.get_size(), "multi_conn": h0.can_multi_conn(), "flush": h0.can_flush(),
            "trim": h0.can_trim(), "zero": h0.can_zero(), "fast_zero": h0.can_fast_zero(),
            "fua": h0.can_fua(), "read_only": h0.is_read_only(),
            "block_min": h0.get_block_size(nbd.SIZE_MINIMUM),
            "block_preferred": h0.get_block_size(nbd.SIZE_PREFERRED),
            "block_max": h0.get_block_size(nbd.SIZE_MAXIMUM)}
    res["export"] = info
    log(f"export: {info}")
    check(info["size"] == IMAGE_SIZE, f"export size {info['size']}, image is {IMAGE_SIZE}")
    for k in ("multi_conn", "flush", "trim", "zero", "fua"):
        check(info[k], f"the export does not advertise {k}")
    check(not info["read_only"], "the export is read-only")

    # nbdcopy in: share/src.bin -> the start of the export
    t = time.monotonic()
    sh(["nbdcopy", "--flush", os.path.join(share, "src.bin"), uri], timeout=120)
    res["t_copy_in"] = round(time.monotonic() - t, 2)
    log(f"nbdcopy in: {REGIONS['copy_in'][1] >> 20} MiB in {res['t_copy_in']}s")

    # several connections x threads at once, mixed request sizes
    off, length = REGIONS["parallel"]
    data = region_data(seed, "parallel", length)
    chunks = chunk_plan(off, length)
    nthreads = CONNECTIONS * THREADS_PER_CONNECTION
    errors: list[str] = []

    def writer(i: int) -> None:
        h = handles[i % CONNECTIONS]
        try:
            for o, n in chunks[i::nthreads]:
                h.pwrite(data[o - off:o - off + n], o)
        except Exception as e:   # noqa: BLE001 - reported below
            errors.append(f"writer {i}: {e!r}")

    def reader(i: int) -> None:
        h = handles[(i + 1) % CONNECTIONS]   # another connection than the one that wrote
        try:
            for o, n in chunks[i::nthreads]:
                if h.pread(n, o) != data[o - off:o - off + n]:
                    errors.append(f"reader {i}: {n} bytes at {o} differ")
        except Exception as e:   # noqa: BLE001
            errors.append(f"reader {i}: {e!r}")

    for fn, what in ((writer, "write"), (reader, "read back")):
        t = time.monotonic()
        threads = [threading.Thread(target=fn, args=(i,)) for i in range(nthreads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        check(not errors, f"parallel {what}: {errors[:5]}")
        res[f"t_parallel_{what.replace(' ', '_')}"] = round(time.monotonic() - t, 2)
        log(f"parallel {what}: {len(chunks)} requests, {length >> 20} MiB, {CONNECTIONS} "
            f"connections x {THREADS_PER_CONNECTION} threads in {time.monotonic() - t:.2f}s")

    # flush, trim and zero
    t = time.monotonic()
    off, length = REGIONS["zero_trim"]
    data = region_data(seed, "zero_trim", length)
    for o in range(0, length, 2 * MiB):
        handles[1].pwrite(data[o:o + 2 * MiB], off + o)
    handles[1].flush()
    done = {}
    for kind, o, n in HOLES:
        h = handles[2]
        if kind == "trim":
            h.trim(n, off + o)
        elif kind == "zero_nohole":
            h.zero(n, off + o, nbd.CMD_FLAG_NO_HOLE)
        elif kind == "zero":
            h.zero(n, off + o)
        elif kind == "zero_fast":
            if not info["fast_zero"]:
                done[kind] = "not advertised"
                continue
            try:
                h.zero(n, off + o, nbd.CMD_FLAG_FAST_ZERO)
            except nbd.Error as e:
                done[kind] = f"refused: {e}"
                continue
        done[kind] = "ok"
    res["fast_zero_done"] = done.get("zero_fast") == "ok"
    for h in handles:
        h.flush()
    got = handles[3].pread(length, off)   # another connection
    want = bytearray(data)
    for kind, o, n in HOLES:
        if kind != "zero_fast" or res["fast_zero_done"]:
            want[o:o + n] = bytes(n)
    diff = describe_difference(got, want)
    check(diff is None, f"after trim/zero: {diff}")
    res["holes"] = done
    res["t_zero_trim"] = round(time.monotonic() - t, 2)
    log(f"trim/zero/flush: {done} in {res['t_zero_trim']}s, read back on another connection")

    # FUA writes, each read back at once on another connection; the device's last bytes
    t = time.monotonic()
    off, length = REGIONS["fua"]
    data = region_data(seed, "fua", length)
    for o in range(0, length, 256 * KiB):
        handles[0].pwrite(data[o:o + 256 * KiB], off + o, nbd.CMD_FLAG_FUA)
        check(handles[3].pread(256 * KiB, off + o) == data[o:o + 256 * KiB],
              f"FUA write at {off + o} not read back on another connection")
    off, length = REGIONS["tail"]
    handles[2].pwrite(region_data(seed, "tail", length), off)
    handles[2].flush()
    check(handles[1].pread(length, off) == region_data(seed, "tail", length),
          "the device's last 64 KiB not read back")
    res["t_fua_tail"] = round(time.monotonic() - t, 2)
    log(f"FUA writes and the tail: {res['t_fua_tail']}s")
    for h in handles:
        h.shutdown()
    handles.clear()   # the handles close when dropped (libnbd 1.14's binding has no close())

    # nbdcopy out: the whole export -> share/out.img (the host compares it with the image)
    t = time.monotonic()
    sh(["nbdcopy", uri, os.path.join(share, "out.img")], timeout=120)
    res["t_copy_out"] = round(time.monotonic() - t, 2)
    log(f"nbdcopy out: {IMAGE_SIZE >> 20} MiB in {res['t_copy_out']}s")


def nbdkit_run(procs: Procs, target: list[str], queues: int, seed: str, share: str,
               res: dict[str, Any]) -> None:
    """nbdkit + plugin on ``target`` (vdpa=... / pci=... / socket=...), the client checks, then
    SIGTERM and the stats it wrote at exit."""
    sock, pidfile, stats = "/tmp/nbd.sock", "/tmp/nbdkit.pid", "/tmp/stats.json"
    cmd = ["nbdkit", "-f", "-U", sock, "-P", pidfile, "python", PLUGIN, *target,
           f"num-queues={queues}", f"stats={stats}"]
    res["nbdkit_command"] = " ".join(cmd)
    t = time.monotonic()
    p = procs.start("nbdkit", cmd)
    wait_until(lambda: os.path.exists(pidfile), "nbdkit's pid file", 60, p, procs, "nbdkit")
    res["t_nbdkit_start"] = round(time.monotonic() - t, 2)
    log(f"nbdkit listening after {res['t_nbdkit_start']}s")
    nbd_checks(f"nbd+unix:///?socket={sock}", seed, share, res)
    check(p.poll() is None, f"nbdkit died:\n{procs.tail('nbdkit')}")
    rc = procs.stop(p)
    check(rc == 0, f"nbdkit exited with {rc} after SIGTERM:\n{procs.tail('nbdkit')}")
    with open(stats) as f:
        st = json.load(f)
    res["stats"] = st
    used = [q["index"] for q in st["queues"] if q["requests"] > 0]
    res["queues_used"] = used
    log("stats: " + ", ".join(f"q{q['index']}: {q['requests']} requests {q['bytes'] >> 20} MiB "
                              f"max_depth {q['max_depth']}" for q in st["queues"]))
    check(len(st["queues"]) == queues, f"stats list {len(st['queues'])} queues, not {queues}")
    check(len(used) >= 2, f"only queues {used} carried requests")
    check(st["totals"]["errors"] == 0, f"the device reported errors: {st['totals']}")
    check(st["totals"]["in_flight"] == 0, f"requests still in flight: {st['totals']}")
    check(st["state"] == "connected" and st["reconnects"] == 0,
          f"state {st['state']}, reconnects {st['reconnects']}, failure {st['failure']}")


# --------------------------------------------------------------------------- ring wrap-around

def ring_wrap_check(name: str, opener: Callable[[], Any], seed: str,
                    res: dict[str, Any]) -> None:
    """vblk_core alone on the device the NBD checks wrote: one thread per queue (the dispatcher
    gives a fresh device's first threads one queue each), each reading 2 x queue-size + 8
    random 4 KiB blocks and comparing them with the model, so every used ring wraps twice
    and every used ring slot is written by the device at least once."""
    t = time.monotonic()
    dev = opener()
    try:
        want = expected_image(seed, res.get("fast_zero_done", False))
        n = 2 * dev.queue_size + 8
        errors: list[str] = []

        def worker(i: int) -> None:
            rng = random.Random(f"{seed}:wrap:{i}")
            buf = bytearray(4096)
            try:
                for _ in range(n):
                    off = rng.randrange(IMAGE_SIZE // 4096) * 4096
                    dev.pread(buf, off)
                    if buf != want[off:off + 4096]:
                        errors.append(f"thread {i}: 4 KiB at {off} differ from what was written")
                        return
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(f"thread {i}: {e!r}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(dev.num_queues)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        per_queue = [q["requests"] for q in dev.stats()["queues"]]
    finally:
        dev.close()
    res.setdefault("ring_wrap", {})[name] = per_queue
    check(not errors, f"{name}: reads with every ring wrapping twice: {errors[:4]}")
    check(all(r >= n for r in per_queue),
          f"{name}: expected >= {n} requests on every queue, got {per_queue}")
    log(f"{name}: every ring wrapped twice ({per_queue} requests, data checked) in "
        f"{time.monotonic() - t:.2f}s")


# --------------------------------------------------------------------------- driver-only bench

WORKLOADS = [("4k randread qd1", 4 * KiB, 1, True), ("4k randread qd8", 4 * KiB, 8, True),
             ("1M seqread qd1", 1 * MiB, 1, False)]


def bench_one(dev: Any, bs: int, depth: int, rand: bool, seconds: float,
              span: int) -> dict[str, float]:
    stop = threading.Event()
    counts = [0] * depth
    blocks = span // bs
    errors: list[str] = []

    def worker(i: int) -> None:
        rng = random.Random(i)
        buf = bytearray(bs)
        pos = i * blocks // depth
        n = 0
        try:
            while not stop.is_set():
                if rand:
                    off = rng.randrange(blocks) * bs
                else:
                    off = pos % blocks * bs
                    pos += 1
                dev.pread(buf, off)
                n += 1
        except Exception as e:   # noqa: BLE001
            errors.append(repr(e))
        counts[i] = n

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(depth)]
    c0, t0 = time.process_time(), time.monotonic()
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - t0
    check(not errors, f"benchmark reads failed: {errors[:3]}")
    ops = sum(counts)
    return {"ops": round(ops / elapsed, 1), "mbs": round(ops * bs / elapsed / 1e6, 2),
            "cpu_us": round((time.process_time() - c0) / max(ops, 1) * 1e6, 1),
            "requests": ops}


def driver_bench(engines: list[tuple[str, Callable[[], Any]]], seconds: float, rounds: int,
                 span: int, share: str, res: dict[str, Any], title: str) -> None:
    """Every engine (name, opener of a vblk_core BlockDevice) open at once; ``rounds`` rounds of
    every workload on every engine in turn (interleaved, so a change in the host's load hits
    all of them alike); the median per (workload, engine) into res and share/bench.md."""
    devs = []
    try:
        for name, opener in engines:
            t = time.monotonic()
            devs.append((name, opener()))
            log(f"bench {name}: opened in {time.monotonic() - t:.2f}s, "
                f"{devs[-1][1].num_queues} queues")
        runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        for rnd in range(rounds):
            for wname, bs, depth, rand in WORKLOADS:
                for name, dev in devs:
                    r = bench_one(dev, bs, depth, rand, seconds, span)
                    runs.setdefault(wname, {}).setdefault(name, []).append(r)
                    log(f"bench {rnd + 1}/{rounds} {name:11s} {wname:16s} {r['ops']:8.1f} ops/s "
                        f"{r['mbs']:7.2f} MB/s {r['cpu_us']:8.1f} us CPU/req")
    finally:
        for _, dev in devs:
            dev.close()

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2

    out: dict[str, dict[str, dict[str, Any]]] = {
        w: {n: {k: round(median([r[k] for r in rs]), 2) for k in ("ops", "mbs", "cpu_us")}
                | {"runs": [r["ops"] for r in rs]} for n, rs in per.items()}
        for w, per in runs.items()}
    res["bench"] = out
    names = [n for n, _ in engines]
    lines = [f"### {title}", "",
             f"vblk_core alone (no nbdkit) in a TCG guest (kernel {os.uname().release}, 1 vCPU); "
             f"median of {rounds} interleaved runs of {seconds:g} s per workload; reads over the "
             f"first {span >> 20} MiB. TCG: compare the columns, not the absolutes.",
             "", "| workload | " + " | ".join(names) + " | " +
             " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
             "|---" * (1 + 2 * len(names) - 1) + "|"]
    for wname, bs, _d, _r in WORKLOADS:
        key, unit = ("ops", "IOPS") if bs < MiB else ("mbs", "MB/s")
        vals = [out[wname][n][key] for n in names]
        ratios = [f"{v / vals[0]:.2f}" if vals[0] else "-" for v in vals[1:]]
        lines.append(f"| {wname} | " + " | ".join(f"{v:g} {unit}" for v in vals) + " | "
                     + " | ".join(ratios) + " |")
    lines += ["", "CPU per request (the benchmark process; the back-end's not counted), us: "
              + "; ".join(f"{w}: " + ", ".join(f"{n} {out[w][n]['cpu_us']:g}" for n in names)
                          for w, *_ in WORKLOADS), ""]
    with open(os.path.join(share, "bench.md"), "w") as f:
        f.write("\n".join(lines))


def vblk_info_check(device: str, queues: int, queue_size: int, serial: str,
                    res: dict[str, Any]) -> None:
    """``vblk info DEVICE`` (``python3 -m vblk_plugin`` from this checkout) while nothing else
    has the device: printed, kept in res["vblk_info"], its JSON checked against the export."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "plugin"), REPO])}
    cmd = [sys.executable, "-m", "vblk_plugin", "info", device, "--timeout", "30"]
    t = time.monotonic()
    outputs = []
    for extra in ([], ["--json"]):
        r = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=180)
        check(r.returncode == 0 and not r.stderr, f"vblk info {device} failed: {r.stderr}")
        outputs.append(r.stdout)
    info = json.loads(outputs[1])
    res["vblk_info"] = {"text": outputs[0], "json": info}
    log(f"vblk info {device} (twice in {time.monotonic() - t:.2f}s):\n{outputs[0]}")
    key, _, value = device.partition("=")
    got = (info["transport"], info["target"], info["capacity"], info["num_queues"],
           info["max_queue_size"], info["serial"])
    want = ({"vdpa": "vhost-vdpa", "pci": "vfio-pci", "socket": "vhost-user"}[key], value,
            IMAGE_SIZE, queues, queue_size, serial)
    check(got == want, f"vblk info {device}: {got}, expected {want}")
    check(outputs[0].startswith(f"device: {info['description']}\n"),
          f"vblk info {device}: the text does not start with the description")


def open_vdpa(path: str, queues: int) -> Callable[[], Any]:
    from vblk_core import BlockDevice, VhostVdpaConnector
    return lambda: BlockDevice.open(VhostVdpaConnector(path), num_queues=queues)


def open_vhost_user(path: str, queues: int) -> Callable[[], Any]:
    from vblk_core import BlockDevice, VhostUserConnector
    return lambda: BlockDevice.open(VhostUserConnector(path, timeout=10.0), num_queues=queues)


def open_vfio(addr: str, queues: int) -> Callable[[], Any]:
    from vblk_core import BlockDevice
    from vblk_core.transports.vfio_pci import (  # type: ignore[import-not-found,unused-ignore]
        VfioPciConnector,
    )
    return lambda: BlockDevice.open(VfioPciConnector(addr), num_queues=queues)


# --------------------------------------------------------------------------- scenarios

def scenario_vdpa(plan: dict[str, Any], procs: Procs, share: str, res: dict[str, Any]) -> None:
    queues = plan["queues"]
    disk = disk_by_serial(plan["serial"])
    log(f"image disk: {disk}")
    qsd = Qsd(procs, disk, queues, "/tmp/vhost-user.sock")
    res["vhost_vdpa"] = qsd.vhost_vdpa
    try:
        vblk_info_check(f"vdpa={qsd.vhost_vdpa}", queues, 256, VDUSE_SERIAL, res)
        via = plan.get("nbd_via", "vdpa")
        target = [f"vdpa={qsd.vhost_vdpa}"] if via == "vdpa" else [f"socket={qsd.vhost_socket}"]
        nbdkit_run(procs, target, queues, plan["seed"], share, res)
        ring_wrap_check("vhost-vdpa", open_vdpa(qsd.vhost_vdpa, queues), plan["seed"], res)
        if plan.get("bench_seconds"):
            driver_bench([("vhost-vdpa", open_vdpa(qsd.vhost_vdpa, queues)),
                          ("vhost-user", open_vhost_user(qsd.vhost_socket, queues))],
                         plan["bench_seconds"], plan.get("bench_rounds", 1), 48 * MiB, share, res,
                         "vhost-vdpa (VDUSE) vs vhost-user, same qemu-storage-daemon and disk")
    finally:
        qsd.stop()


def scenario_vfio(plan: dict[str, Any], procs: Procs, share: str, res: dict[str, Any]) -> None:
    queues, addr = plan["queues"], plan["pci"]
    t = time.monotonic()
    res["vfio_group"] = bind_vfio(addr)
    res["t_bind"] = round(time.monotonic() - t, 2)
    if plan.get("nbd", True):
        nbdkit_run(procs, [f"pci={addr}"], queues, plan["seed"], share, res)
        ring_wrap_check("vfio-pci", open_vfio(addr, queues), plan["seed"], res)
    if plan.get("bench_seconds"):
        engines = [("vfio-pci", open_vfio(addr, queues))]
        qsd = None
        if plan.get("bench_serial"):
            qsd = Qsd(procs, disk_by_serial(plan["bench_serial"]), plan["bench_queues"],
                      "/tmp/vhost-user.sock")
            engines += [("vhost-vdpa", open_vdpa(qsd.vhost_vdpa, plan["bench_queues"])),
                        ("vhost-user", open_vhost_user(qsd.vhost_socket, plan["bench_queues"]))]
        try:
            driver_bench(engines, plan["bench_seconds"], plan.get("bench_rounds", 1), 48 * MiB,
                         share, res,
                         "vfio-pci (QEMU's virtio-blk-pci) vs vhost-vdpa (VDUSE) vs vhost-user")
        finally:
            if qsd:
                qsd.stop()


def scenario_script(plan: dict[str, Any], procs: Procs, share: str, res: dict[str, Any]) -> None:
    """For investigations by hand: run(plan, procs, share, res) from the file plan["script"]."""
    import runpy
    runpy.run_path(plan["script"])["run"](plan, procs, share, res)


SCENARIOS = {"vdpa": scenario_vdpa, "vfio": scenario_vfio, "script": scenario_script}


def main() -> int:
    share = sys.argv[1]
    sys.path.insert(0, REPO)
    res: dict[str, Any] = {"ok": False}
    logdir = os.path.join(share, "logs")
    os.makedirs(logdir, exist_ok=True)
    procs = Procs(logdir)
    line = "FAIL no result"
    try:
        with open(os.path.join(share, "plan.json")) as f:
            plan = json.load(f)
        log(f"plan: {plan}")
        res["kernel"] = os.uname().release
        SCENARIOS[plan["scenario"]](plan, procs, share, res)
        res["ok"] = True
        line = (f"OK {plan['scenario']} queues_used={res.get('queues_used')} "
                f"copy_in={res.get('t_copy_in')}s copy_out={res.get('t_copy_out')}s")
    except CheckFailed as e:
        res["error"] = str(e)
        line = f"FAIL {str(e).splitlines()[0] if str(e) else 'check failed'}"
        log(f"FAILED: {e}")
    except Exception as e:   # noqa: BLE001 - reported to the host
        res["error"] = traceback.format_exc()
        line = f"FAIL {type(e).__name__}: {e}".splitlines()[0]
        log(res["error"])
    finally:
        procs.stop_all()
        res["seconds"] = round(time.monotonic() - T0, 2)
        with open(os.path.join(share, "results.json.tmp"), "w") as f:
            json.dump(res, f, indent=1)
        os.rename(os.path.join(share, "results.json.tmp"), os.path.join(share, "results.json"))
    print(f"{RESULT} {line}", flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
