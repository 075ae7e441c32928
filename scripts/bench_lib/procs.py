"""Clean-up of the harness's children, and /proc readings of what they cost.

The processes themselves are started and stopped by vblk_tools.harness (spawn/stop_process:
own session, parent-death signal, stopped by PID).  install_cleanup() makes sure they are
stopped in order (newest first) at exit and on SIGTERM/SIGHUP too.
"""

import atexit
import os
import signal
import sys

from vblk_plugin.placement import parse_cpu_list, pin_process
from vblk_tools import harness

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _on_signal(signum, frame):
    # Turn the signal into SystemExit so finally blocks and atexit run.
    raise SystemExit(128 + signum)


def install_cleanup():
    atexit.register(harness.stop_all)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    # Also when started in the background by a shell that ignores SIGINT there.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def log_tail(path, lines=15):
    try:
        with open(path, "rb") as f:
            data = f.read()[-8192:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# ---- /proc readings -------------------------------------------------------------------------

def cpu_ticks(pid):
    """utime+stime of the whole process (all threads), in clock ticks; None if gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return int(fields[11]) + int(fields[12])


def context_switches(pid):
    """Voluntary + involuntary context switches of all threads of pid (a wake-up count);
    None if gone."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if "ctxt_switches:" in line:
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass   # a thread that just ended
    return total


def exited(pid):
    """Whether process pid has ended (gone, or a zombie not yet reaped by its parent)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return True
    return s[s.rindex(")") + 2:].split()[0] in ("Z", "X")


def num_threads(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except OSError:
        return None
    return int(s[s.rindex(")") + 2:].split()[17])


def status_kib(pid, key):
    """A kB field (VmHWM, VmRSS, ...) of /proc/PID/status, in KiB; None if unavailable."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kib(pid):
    """Current RSS in KiB via psutil when present, else /proc/PID/statm."""
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss // 1024
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process is gone or not ours: no figure
        return None
    try:
        with open("/proc/%d/statm" % pid) as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except OSError:
        return None


def system_ticks():
    """(busy, steal) clock ticks of the whole machine from /proc/stat's cpu line."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest is already inside user)
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy, (v[7] if len(v) > 7 else 0)


def tree_pids(pid):
    """pid and all its descendants (psutil), or just pid without psutil."""
    try:
        import psutil
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - the process is gone or not ours: just pid
        return [pid]


def alive(p):
    return p.poll() is None


def eprint(*a):
    print(*a, file=sys.stderr, flush=True)


def pin(pid, cpus):
    """Pin every thread of ``pid`` and of its descendants to ``cpus`` (a CPU list such as
    "0-1"), as the plugin's placement= pins its own process."""
    cpu_set = parse_cpu_list(cpus)
    for p in tree_pids(pid):
        try:
            pin_process(p, cpu_set)
        except FileNotFoundError:
            pass   # a descendant that just ended
