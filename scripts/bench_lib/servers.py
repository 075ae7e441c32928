"""The NBD servers the harness compares, and how to start and stop each one.

A server is started fresh for every run (one server, one workload) and stopped after it, so each
run's CPU, peak RSS (VmHWM) and startup state are its own.  Every server listens on a unix socket.
"""

import glob
import hashlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from . import procs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOOR_PLUGIN = os.path.join(ROOT, "benchmarks", "floor_plugin.py")
DEFAULT_VBLK_PLUGIN = os.path.join(ROOT, "plugin", "plugin.py")


class StartError(Exception):
    pass


@dataclass
class ServerSpec:
    name: str
    kind: str                      # vblk | floor | file | qsd-nbd | memory
    description: str
    nbdkit_threads: int = None     # nbdkit -t (None: nbdkit's default, 16)
    aio: str = None                # qemu-storage-daemon file node aio= (None: threads)
    queues: int = None             # qemu-storage-daemon vhost-user-blk num-queues
    plugin: str = None             # vblk plugin path
    plugin_args: list = field(default_factory=list)   # extra KEY=VALUE for the plugin
    floor_model: str = None        # serialized | parallel
    env: dict = field(default_factory=dict)           # extra environment for nbdkit
    stats: bool = False            # pass stats=PATH to the vblk plugin and collect it

    def to_json(self):
        return {k: v for k, v in self.__dict__.items() if v not in (None, [], {})}


class Running:
    """A started server: its NBD URI, the PIDs to measure by role, and how to stop it."""

    def __init__(self, spec, uri):
        self.spec = spec
        self.uri = uri
        self.procs = []            # (role, Popen), in start order
        self.argv = {}             # role -> argv
        self.logs = {}             # role -> log path
        self.stats_path = None
        self.main_role = None      # the process that speaks NBD
        self.code_version = None   # vblk: hash of the plugin + vblk_core sources at start

    def pids(self):
        return {role: p.pid for role, p in self.procs}

    def dead(self):
        """Roles whose process has exited."""
        return [role for role, p in self.procs if p.poll() is not None]

    def stop(self):
        """Stop newest first (nbdkit before the daemon behind it). Returns seconds taken."""
        t = 0.0
        for role, p in reversed(self.procs):
            t += procs.stop(p, signal.SIGTERM, timeout=10.0)
        self.procs = []
        return t


def nbd_uri(sock):
    # Empty export name (the path after "/"): nbdkit's default and qsd's name= export.
    return "nbd+unix:///?socket=" + sock


def _wait_for(pred, p, timeout, what, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if p.poll() is not None:
            raise StartError("%s exited with status %s before it was ready:\n%s"
                             % (what, p.returncode, procs.log_tail(log)))
        time.sleep(0.02)
    raise StartError("%s not ready after %.0f s:\n%s" % (what, timeout, procs.log_tail(log)))


def _start_qsd(run, image, sockdir, tag, log, timeout, aio=None, vhost_queues=None):
    file_node = "driver=file,node-name=file0,filename=%s" % image
    if aio:
        file_node += ",aio=%s" % aio
    argv = ["qemu-storage-daemon", "--blockdev", file_node,
            "--blockdev", "driver=raw,node-name=raw0,file=file0"]
    if vhost_queues is not None:
        sock = os.path.join(sockdir, tag + ".vhost")
        argv += ["--export", "type=vhost-user-blk,id=exp0,node-name=raw0,addr.type=unix,"
                 "addr.path=%s,writable=on,num-queues=%d" % (sock, vhost_queues)]
    else:
        sock = os.path.join(sockdir, tag + ".nbd")
        argv += ["--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                 "--export", "type=nbd,id=exp0,node-name=raw0,name=,writable=on"]
    if os.path.exists(sock):
        os.unlink(sock)
    p = procs.spawn(argv, log)
    run.procs.append(("qsd", p))
    run.argv["qsd"] = argv
    run.logs["qsd"] = log
    _wait_for(lambda: os.path.exists(sock), p, timeout, "qemu-storage-daemon", log)
    return sock


def _start_nbdkit(run, plugin_argv, sockdir, tag, log, timeout, threads=None, env=None):
    sock = os.path.join(sockdir, tag + ".nbd")
    pidfile = os.path.join(sockdir, tag + ".pid")
    for f in (sock, pidfile):
        if os.path.exists(f):
            os.unlink(f)
    argv = ["nbdkit", "-f", "-U", sock, "-P", pidfile]
    if threads:
        argv += ["-t", str(threads)]
    argv += plugin_argv
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    p = procs.spawn(argv, log, env=full_env)
    run.procs.append(("nbdkit", p))
    run.argv["nbdkit"] = argv
    run.logs["nbdkit"] = log
    run.main_role = "nbdkit"

    def ready():
        try:
            with open(pidfile) as f:
                return f.read().strip() == str(p.pid) and os.path.exists(sock)
        except OSError:
            return False
    _wait_for(ready, p, timeout, "nbdkit", log)
    run.uri = nbd_uri(sock)
    return sock


def code_version(plugin):
    """Short hash of the plugin and the vblk_core sources next to it (or in ROOT), so a report
    can tell when the code changed between runs (a fresh nbdkit loads the files every run)."""
    h = hashlib.sha1()
    core = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(plugin))), "vblk_core")
    if not os.path.isdir(core):
        core = os.path.join(ROOT, "vblk_core")
    files = [plugin] + sorted(glob.glob(os.path.join(core, "*.py")))
    for f in files:
        try:
            with open(f, "rb") as fh:
                h.update(os.path.basename(f).encode() + b"\0" + fh.read())
        except OSError:
            pass
    return h.hexdigest()[:12]


def start(spec, image, sockdir, logdir, tag, timeout=30.0):
    """Start spec serving image; return a Running.  Raises StartError (after cleaning up)."""
    run = Running(spec, None)
    log = lambda role: os.path.join(logdir, "%s.%s.log" % (tag, role))
    try:
        if spec.kind == "qsd-nbd":
            sock = _start_qsd(run, image, sockdir, tag, log("qsd"), timeout, aio=spec.aio)
            run.uri = nbd_uri(sock)
            run.main_role = "qsd"
        elif spec.kind == "vblk":
            if not os.path.exists(spec.plugin):
                raise StartError("plugin %s does not exist" % spec.plugin)
            run.code_version = code_version(spec.plugin)
            vsock = _start_qsd(run, image, sockdir, tag, log("qsd"), timeout, aio=spec.aio,
                               vhost_queues=spec.queues)
            pargs = ["python", spec.plugin, "socket=" + vsock] + list(spec.plugin_args)
            if spec.stats:
                run.stats_path = os.path.join(logdir, tag + ".stats")
                pargs.append("stats=" + run.stats_path)
            _start_nbdkit(run, pargs, sockdir, tag, log("nbdkit"), timeout,
                          spec.nbdkit_threads, spec.env)
        elif spec.kind == "floor":
            pargs = ["python", spec.plugin or FLOOR_PLUGIN, "file=" + image,
                     "threads=" + spec.floor_model] + list(spec.plugin_args)
            _start_nbdkit(run, pargs, sockdir, tag, log("nbdkit"), timeout,
                          spec.nbdkit_threads, spec.env)
        elif spec.kind == "file":
            _start_nbdkit(run, ["file", image], sockdir, tag, log("nbdkit"), timeout,
                          spec.nbdkit_threads, spec.env)
        elif spec.kind == "memory":
            size = os.stat(image).st_size
            _start_nbdkit(run, ["memory", str(size)], sockdir, tag, log("nbdkit"), timeout,
                          spec.nbdkit_threads, spec.env)
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
        raise StartError("nbdinfo --size timed out after %.0f s" % timeout)
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
             extra=()):
        specs.append(ServerSpec(name, "vblk", desc, nbdkit_threads=threads, aio=aio,
                                queues=queues, plugin=plugin,
                                plugin_args=list(opts.vblk_arg) + list(extra),
                                env=vblk_env, stats=opts.vblk_stats))

    vblk("vblk-threads", None, "vblk plugin over qemu-storage-daemon vhost-user-blk, aio=threads")
    vblk("vblk-io_uring", "io_uring",
         "vblk plugin over qemu-storage-daemon vhost-user-blk, aio=io_uring")
    for v in opts.vblk_variant:
        name, sep, body = v.partition(":")
        if not sep or not name:
            raise ValueError("--vblk-variant wants NAME:KEY=VAL,..., got %r" % v)
        aio, threads, queues, extra = None, opts.vblk_threads, opts.vblk_queues, []
        for item in filter(None, body.split(",")):
            k, val = _parse_kv(item)
            if k == "aio":
                aio = None if val == "threads" else val
            elif k in ("t", "threads"):
                threads = int(val)
            elif k == "queues":
                queues = int(val)
            else:
                extra.append("%s=%s" % (k, val))
        vblk("vblk-" + name, aio, "vblk variant %s (%s)" % (name, body or "defaults"),
             threads=threads, queues=queues, extra=extra)
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
