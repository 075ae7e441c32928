"""An nbdkit Python plugin that runs another one under cProfile (used by scripts/profile_plugin).

    VBLK_PROFILE_TARGET=plugin/plugin.py VBLK_PROFILE=/tmp/out.pstats \
        nbdkit -f -U SOCK python scripts/bench_lib/profile_wrapper.py KEY=VALUE...

It loads the target plugin as a module, re-exports its API_VERSION and every nbdkit callback it
defines (and only those, so nbdkit sees the same feature set), and wraps each callback so that it
runs under a per-thread cProfile.Profile.  Python threads the plugin starts are profiled for their
whole life (threading.Thread._bootstrap_inner is wrapped before the plugin is imported).  At
cleanup() (nbdkit >= 1.28 calls it at exit; atexit as a fallback) all per-thread profiles are
merged into one pstats file at $VBLK_PROFILE, and a per-thread summary is written next to it
as $VBLK_PROFILE.threads.txt.  VBLK_PROFILE_CLOCK=cpu (default: per-thread CPU time) or wall
(cProfile's default clock: also counts time spent blocked).  The plugin needs no change;
cProfile slows Python code down (roughly 1.5-3x), so throughput under profiling is not the
real throughput.
"""

import atexit
import builtins
import cProfile
import importlib.util
import os
import pstats
import sys
import threading
import time

_TARGET = os.environ.get("VBLK_PROFILE_TARGET")
_OUT = os.environ.get("VBLK_PROFILE")
if not _TARGET or not _OUT:
    raise RuntimeError("profile_wrapper: set VBLK_PROFILE_TARGET=plugin.py and "
                       "VBLK_PROFILE=output.pstats")

# VBLK_PROFILE_CLOCK=cpu (default): per-thread CPU time, so time blocked in locks, poll() or
# I/O counts as ~0 and the report shows where the CPU goes.  =wall: wall-clock time (cProfile's
# default), which shows where threads wait.
_CLOCK = os.environ.get("VBLK_PROFILE_CLOCK", "cpu")
if _CLOCK not in ("cpu", "wall"):
    raise RuntimeError("profile_wrapper: VBLK_PROFILE_CLOCK must be cpu or wall")

_CALLBACKS = (
    "dump_plugin", "config", "config_complete", "thread_model", "get_ready", "after_fork",
    "cleanup", "list_exports", "default_export", "preconnect", "open", "close",
    "export_description", "get_size", "block_size", "is_rotational", "can_multi_conn",
    "can_write", "can_flush", "can_trim", "can_zero", "can_fast_zero", "can_fua", "can_cache",
    "can_extents", "pread", "pwrite", "flush", "trim", "zero", "cache", "extents",
)

_lock = threading.Lock()
# Keyed by native thread id, not threading.local: nbdkit may give a C worker thread a fresh
# Python thread state for each callback, which would reset thread-local data every time.
_by_tid = {}              # tid -> [name, Profile, depth]
_dumped = False


def _entry():
    tid = threading.get_native_id()
    e = _by_tid.get(tid)
    if e is None:
        p = cProfile.Profile(time.thread_time) if _CLOCK == "cpu" else cProfile.Profile()
        e = ["%s (%d)" % (threading.current_thread().name, tid), p, 0]
        with _lock:
            _by_tid[tid] = e
    return e


def _wrap(fn):
    def wrapper(*args):
        e = _entry()
        if e[2]:
            return fn(*args)
        e[2] = 1
        e[1].enable()
        try:
            return fn(*args)
        finally:
            e[1].disable()
            e[2] = 0
    wrapper.__name__ = fn.__name__
    wrapper.__wrapped__ = fn
    return wrapper


# Profile every Python thread the plugin starts, for its whole life.
_orig_bootstrap_inner = threading.Thread._bootstrap_inner


def _bootstrap_inner(self):
    e = _entry()
    e[0] = "%s (%d)" % (self.name, threading.get_native_id())
    e[2] = 1
    e[1].enable()
    try:
        _orig_bootstrap_inner(self)
    finally:
        e[1].disable()


threading.Thread._bootstrap_inner = _bootstrap_inner

# Load the target as if nbdkit had loaded it (its directory first on sys.path, like a script).
sys.path.insert(0, os.path.dirname(os.path.abspath(_TARGET)))
_spec = importlib.util.spec_from_file_location("_vblk_profiled_plugin", _TARGET)
if _spec is None or _spec.loader is None:
    raise RuntimeError(f"profile_wrapper: cannot load {_TARGET} as a Python module")
_target = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _target
_load = _entry()
_load[2] = 1
_load[1].enable()
try:
    _spec.loader.exec_module(_target)
finally:
    _load[1].disable()
    _load[2] = 0

API_VERSION = getattr(_target, "API_VERSION", 1)
for _name in _CALLBACKS:
    _fn = getattr(_target, _name, None)
    if callable(_fn) and _name != "cleanup":
        globals()[_name] = _wrap(_fn)


def _dump():
    global _dumped
    if _dumped:
        return
    _dumped = True
    merged = None
    rows = []
    with _lock:
        profiles = [(e[0], e[1]) for e in _by_tid.values()]
    for name, p in profiles:
        try:
            p.create_stats()
        except Exception as e:  # noqa: BLE001 - a profile still enabled on another thread
            rows.append((0.0, "%s: cannot snapshot (%s)" % (name, e)))
            continue
        if not p.stats:
            continue
        st = pstats.Stats(p)
        rows.append((st.total_tt, "%-40s %10.3f s (%s clock) in profiled Python code, %d calls"
                     % (name, st.total_tt, _CLOCK, st.total_calls)))
        if merged is None:
            merged = st
        else:
            merged.add(st)
    lines = [text for _, text in sorted(rows, key=lambda r: -r[0])]
    if merged is not None:
        merged.dump_stats(_OUT)
    with builtins.open(_OUT + ".threads.txt", "w") as f:  # "open" here is the plugin's
        f.write("\n".join(lines) + "\n")


def cleanup():
    try:
        fn = getattr(_target, "cleanup", None)
        if callable(fn):
            _wrap(fn)()
    finally:
        _dump()


atexit.register(_dump)
