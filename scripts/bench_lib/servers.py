"""The NBD servers the harness compares, and how to start and stop each one.

A server is started fresh for every run (one server, one workload) and stopped after it, so each
run's CPU, peak RSS (VmHWM) and startup state are its own.  Every server listens on a unix socket.
The processes come from the one harness (vblk_tools.harness): qemu-storage-daemon's argv is
vblk_plugin.qsd.qsd_argv, and a server counts as started once it accepts a connection (the
daemon's vhost-user socket) or sends the NBD greeting (nbdkit, the daemon's NBD export).
"""

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from vblk_tools import ROOT, harness

from . import procs
from .machine import code_version

FLOOR_PLUGIN = os.path.join(ROOT, "benchmarks", "floor_plugin.py")
RT_PLUGIN = os.path.join(ROOT, "benchmarks", "rt_plugin.py")
RT_DEVICE_C = os.path.join(ROOT, "benchmarks", "rt_device.c")
RT_DEVICE = os.path.join(ROOT, "benchmarks", "runs", "rt_device")
DEFAULT_VBLK_PLUGIN = os.path.join(ROOT, "plugin", "plugin.py")


class StartError(Exception):
    pass


@dataclass
class ServerSpec:
    name: str
    kind: str              # vblk rt blkio blkio-file floor file qsd-nbd memory
    description: str
    nbdkit_threads: int | None = None     # nbdkit -t (None: nbdkit's default, 16)
    aio: str | None = None                # qemu-storage-daemon file node aio= (None: threads)
    queues: int | None = None             # qemu-storage-daemon vhost-user-blk num-queues
    plugin: str | None = None             # vblk plugin path
    plugin_args: list = field(default_factory=list)   # extra KEY=VALUE for the plugin
    floor_model: str | None = None        # serialized | parallel
    env: dict = field(default_factory=dict)           # extra environment for nbdkit
    stats: bool = False            # pass stats=PATH to the vblk plugin and collect it
    cpus: dict = field(default_factory=dict)   # role (nbdkit, qsd, device) -> CPU list "0-1"
    fio_cpus: str | None = None    # fio --cpus_allowed
    nbdkit_args: list = field(default_factory=list)   # e.g. ["--filter=noparallel"]
    context: bool = False          # a reference that is not a peer of vblk (marked in reports)

    def to_json(self):
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


class Running:
    """A started server: its NBD URI, the PIDs to measure by role, and how to stop it."""

    def __init__(self, spec, uri):
        self.spec = spec
        self.uri = uri
        self.procs = []            # (role, harness.Qsd or harness.Nbdkit), in start order
        self.argv = {}             # role -> argv
        self.logs = {}             # role -> log path
        self.stats_path = None
        self.main_role = None      # the process that speaks NBD
        self.code_version = None   # vblk: hash of the plugin + vblk_core sources at start

    def add(self, role, server):
        self.procs.append((role, server))
        self.argv[role] = server.command()
        self.logs[role] = str(server.log_path)

    def pids(self):
        return {role: s.pid for role, s in self.procs if s.pid is not None}

    def dead(self):
        """Roles whose process has exited."""
        return [role for role, s in self.procs if not s.running]

    def stop(self):
        """Stop newest first (nbdkit before the daemon behind it). Returns seconds taken."""
        t = 0.0
        for _role, s in reversed(self.procs):
            if s.proc is not None:
                t += harness.stop_process(s.proc, signal.SIGTERM, 10.0).seconds
                s.proc = None
        self.procs = []
        return t


def nbd_uri(sock):
    # Empty export name (the path after "/"): nbdkit's default and qsd's name= export.
    return harness.nbd_uri(sock)


def _start(run, role, server, timeout):
    run.add(role, server)
    try:
        server.start(timeout)
    except harness.HarnessError as e:
        raise StartError(str(e)) from None
    cpus = run.spec.cpus.get(role)
    if cpus:
        procs.pin(server.pid, cpus)
    return server


def rt_device():
    """benchmarks/rt_device.c compiled with the system cc (once per source change)."""
    if (os.path.exists(RT_DEVICE)
            and os.path.getmtime(RT_DEVICE) >= os.path.getmtime(RT_DEVICE_C)):
        return RT_DEVICE
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise StartError("rt needs a C compiler: apt-get install gcc")
    os.makedirs(os.path.dirname(RT_DEVICE), exist_ok=True)
    r = subprocess.run([cc, "-O2", "-Wall", "-o", RT_DEVICE + ".tmp", RT_DEVICE_C],
                       capture_output=True, text=True)
    if r.returncode:
        raise StartError("compiling %s failed: %s" % (RT_DEVICE_C, r.stderr.strip()))
    os.replace(RT_DEVICE + ".tmp", RT_DEVICE)
    return RT_DEVICE


def has_blkio_plugin():
    """Whether this nbdkit has the blkio plugin (nbdkit >= 1.34 built with libblkio)."""
    r = subprocess.run(["nbdkit", "blkio", "--dump-plugin"], capture_output=True, text=True)
    return r.returncode == 0


def _start_qsd(run, image, sockdir, tag, log, timeout, aio=None, vhost_queues=None):
    export = "vhost-user-blk" if vhost_queues is not None else "nbd"
    suffix = ".vhost" if vhost_queues is not None else ".nbd"
    qsd = harness.Qsd(sockdir, name=tag, image=image, socket=os.path.join(sockdir, tag + suffix),
                      log_path=log, aio=aio or "threads", num_queues=vhost_queues or 1,
                      export=export)
    return _start(run, "qsd", qsd, timeout).socket


def _start_nbdkit(run, plugin, keys, sockdir, tag, log, timeout, threads=None, env=None,
                  nbdkit_args=()):
    kit = harness.Nbdkit(sockdir, keys, name=tag, plugin=plugin, threads=threads,
                         extra_env=env, socket=os.path.join(sockdir, tag + ".nbd"),
                         log_path=log, nbdkit_args=nbdkit_args)
    _start(run, "nbdkit", kit, timeout)
    run.main_role = "nbdkit"
    run.uri = kit.uri
    return kit.socket


def start(spec, image, sockdir, logdir, tag, timeout=30.0):
    """Start spec serving image; return a Running.  Raises StartError (after cleaning up)."""
    run = Running(spec, None)

    def log(role):
        return os.path.join(logdir, "%s.%s.log" % (tag, role))

    def nbdkit(plugin, keys):
        _start_nbdkit(run, plugin, keys, sockdir, tag, log("nbdkit"), timeout,
                      spec.nbdkit_threads, spec.env, spec.nbdkit_args)

    try:
        if spec.kind == "qsd-nbd":
            run.uri = nbd_uri(_start_qsd(run, image, sockdir, tag, log("qsd"), timeout,
                                         aio=spec.aio))
            run.main_role = "qsd"
        elif spec.kind == "vblk":
            if not os.path.exists(spec.plugin):
                raise StartError("plugin %s does not exist" % spec.plugin)
            run.code_version = code_version(spec.plugin)
            vsock = _start_qsd(run, image, sockdir, tag, log("qsd"), timeout, aio=spec.aio,
                               vhost_queues=spec.queues)
            keys = ["socket=" + vsock] + list(spec.plugin_args)
            if spec.stats:
                run.stats_path = os.path.join(logdir, tag + ".stats")
                keys.append("stats=" + run.stats_path)
            nbdkit(spec.plugin, keys)
        elif spec.kind == "rt":
            device = rt_device()
            keys = ["file=" + image, "device=" + device]
            if spec.cpus.get("device"):
                keys.append("device-cpus=" + spec.cpus["device"])
            nbdkit(RT_PLUGIN, keys)
        elif spec.kind in ("blkio", "blkio-file"):
            if not has_blkio_plugin():
                raise StartError("this nbdkit has no blkio plugin (nbdkit >= 1.34 with "
                                 "libblkio; Debian 13's nbdkit has it)")
            if spec.kind == "blkio-file":
                # libblkio's io_uring driver on the image itself: no daemon, no virtio-blk.
                nbdkit("blkio", ["io_uring", "path=" + image])
            else:
                vsock = _start_qsd(run, image, sockdir, tag, log("qsd"), timeout,
                                   aio=spec.aio, vhost_queues=spec.queues or 1)
                nbdkit("blkio", ["virtio-blk-vhost-user", "path=" + vsock])
        elif spec.kind == "floor":
            nbdkit(spec.plugin or FLOOR_PLUGIN,
                   ["file=" + image, "threads=" + spec.floor_model] + list(spec.plugin_args))
        elif spec.kind == "file":
            nbdkit("file", [image])
        elif spec.kind == "memory":
            nbdkit("memory", [str(os.stat(image).st_size)] + list(spec.plugin_args))
        else:
            raise StartError("unknown server kind %r" % spec.kind)
    except BaseException:
        run.stop()
        raise
    return run


def probe(uri, expect_size, timeout=20.0):
    """Check that uri answers the NBD handshake with the expected size (nbdinfo, if present)."""
    if not shutil.which("nbdinfo"):
        return None
    try:
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StartError("nbdinfo --size timed out after %.0f s" % timeout) from None
    if r.returncode != 0:
        raise StartError("nbdinfo --size failed: %s" % (r.stderr.strip() or r.stdout.strip()))
    size = int(r.stdout.strip())
    if size != expect_size:
        raise StartError("export size %d, expected %d" % (size, expect_size))
    return size


# ---- the catalogue --------------------------------------------------------------------------

def _parse_kv(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError("expected KEY=VALUE, got %r" % text)
    return key, value


def catalogue(opts):
    """All known servers (name -> ServerSpec), in default run order, from parsed options."""
    plugin = os.path.abspath(opts.plugin)
    vblk_env = dict(_parse_kv(e) for e in opts.vblk_env)
    specs = []

    def vblk(name, aio, desc, threads=opts.vblk_threads, queues=opts.vblk_queues,
             extra=(), cpus=None, fio_cpus=None, path=None):
        specs.append(ServerSpec(name, "vblk", desc, nbdkit_threads=threads, aio=aio,
                                queues=queues, plugin=path or plugin,
                                plugin_args=list(opts.vblk_arg) + list(extra),
                                env=vblk_env, stats=opts.vblk_stats, cpus=dict(cpus or {}),
                                fio_cpus=fio_cpus))

    vblk("vblk-threads", None, "vblk plugin over qemu-storage-daemon vhost-user-blk, aio=threads")
    vblk("vblk-io_uring", "io_uring",
         "vblk plugin over qemu-storage-daemon vhost-user-blk, aio=io_uring")
    for v in opts.vblk_variant:
        name, sep, body = v.partition(":")
        if not sep or not name:
            raise ValueError("--vblk-variant wants NAME:KEY=VAL,..., got %r" % v)
        aio, threads, queues, extra = None, opts.vblk_threads, opts.vblk_queues, []
        cpus, fio_cpus, path = {}, None, None
        for item in filter(None, body.split(",")):
            k, val = _parse_kv(item)
            if k == "plugin-path":      # another checkout's plugin (and its vblk_core)
                path = os.path.abspath(val)
            elif k in ("qsd-cpus", "nbdkit-cpus"):     # pinned from outside, e.g. qsd-cpus=1
                cpus[k.split("-")[0]] = val.replace(";", ",")
            elif k == "fio-cpus":
                fio_cpus = val.replace(";", ",")
            elif k == "aio":
                aio = None if val == "threads" else val
            elif k in ("t", "threads"):
                threads = int(val)
            elif k == "queues":
                queues = int(val)
            else:
                extra.append("%s=%s" % (k, val))
        vblk("vblk-" + name, aio, "vblk variant %s (%s)" % (name, body or "defaults"),
             threads=threads, queues=queues, extra=extra, cpus=cpus, fio_cpus=fio_cpus,
             path=path)
    # The round-trip ceiling (benchmarks/rt_plugin.py + rt_device.c), -t 4 as measured, and
    # pinned: nbdkit on CPU 0, the device and fio on CPU 1.
    specs.append(ServerSpec("rt", "rt", "round-trip ceiling: Python plugin + C device over "
                            "shared memory and eventfds, nbdkit -t 4", nbdkit_threads=4))
    specs.append(ServerSpec("rt-pinned", "rt", "round-trip ceiling, nbdkit on CPU 0, device "
                            "and fio on CPU 1", nbdkit_threads=4,
                            cpus={"nbdkit": "0", "device": "1"}, fio_cpus="1"))
    # vblk's peer: nbdkit's C blkio plugin, driving the same kind of daemon as the vblk servers
    # (same num-queues) through libblkio's virtio-blk-vhost-user driver.  The daemon serves one
    # vhost-user front-end at a time, so each NBD connection waits for the previous one to close.
    specs.append(ServerSpec("blkio", "blkio", "the peer: nbdkit's blkio plugin (C, libblkio's "
                            "virtio-blk-vhost-user driver) over a qemu-storage-daemon "
                            "vhost-user-blk export like vblk-threads' (aio=threads)",
                            queues=opts.vblk_queues))
    specs.append(ServerSpec("blkio-qsd-io_uring", "blkio", "the peer over a daemon like "
                            "vblk-io_uring's: nbdkit's blkio plugin, virtio-blk-vhost-user, "
                            "daemon aio=io_uring", aio="io_uring", queues=opts.vblk_queues))
    specs.append(ServerSpec("blkio-io_uring", "blkio-file", "context, not the peer: nbdkit's "
                            "blkio plugin with libblkio's io_uring driver reading the image file "
                            "directly (no daemon, no virtio-blk device; a C file server like "
                            "`file`)", context=True))
    specs.append(ServerSpec("floor-serialized", "floor",
                            "benchmarks/floor_plugin.py, os.preadv/os.pwrite, "
                            "THREAD_MODEL_SERIALIZE_ALL_REQUESTS",
                            nbdkit_threads=opts.floor_threads, floor_model="serialized"))
    specs.append(ServerSpec("floor-parallel", "floor",
                            "benchmarks/floor_plugin.py, os.preadv/os.pwrite, "
                            "THREAD_MODEL_PARALLEL",
                            nbdkit_threads=opts.floor_threads, floor_model="parallel"))
    specs.append(ServerSpec("file", "file", "nbdkit file plugin (C)",
                            nbdkit_threads=opts.file_threads))
    specs.append(ServerSpec("qsd-nbd", "qsd-nbd", "qemu-storage-daemon NBD export, aio=threads"))
    specs.append(ServerSpec("qsd-nbd-io_uring", "qsd-nbd",
                            "qemu-storage-daemon NBD export, aio=io_uring", aio="io_uring"))
    specs.append(ServerSpec("memory", "memory",
                            "nbdkit memory plugin (C), sparse: reads of unwritten areas are "
                            "zeros; a protocol ceiling, not like-for-like",
                            nbdkit_threads=opts.file_threads))
    specs.append(ServerSpec("memory-serial", "memory",
                            "nbdkit memory plugin behind --filter=noparallel "
                            "serialize=connections: one connection at a time, a check of the "
                            "harness's multi-connection timing, not a reference",
                            nbdkit_threads=opts.file_threads, context=True,
                            nbdkit_args=["--filter=noparallel"],
                            plugin_args=["serialize=connections"]))
    return {s.name: s for s in specs}


DEFAULT_SERVERS = ["vblk-threads", "vblk-io_uring", "floor-serialized", "floor-parallel",
                   "file", "qsd-nbd"]


def select(cat, text):
    """Resolve --servers (names and groups: default, all, vblk, floor, qsd) to ordered names."""
    if not text:
        names = DEFAULT_SERVERS + [n for n in cat if n.startswith("vblk-")
                                   and n not in DEFAULT_SERVERS]
        return [n for n in names if n in cat]
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item == "default":
            group = select(cat, None)
        elif item == "all":
            group = list(cat)
        elif item in ("vblk", "floor", "qsd"):
            prefix = {"vblk": "vblk-", "floor": "floor-", "qsd": "qsd-"}[item]
            group = [n for n in cat if n.startswith(prefix)]
        elif item in cat:
            group = [item]
        else:
            raise ValueError("unknown server %r (known: %s; groups: default all vblk floor qsd)"
                             % (item, ", ".join(cat)))
        out += [n for n in group if n not in out]
    return out
