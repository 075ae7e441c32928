"""placement=: which CPUs nbdkit's threads and the private qemu-storage-daemon run on.

A Python plugin's work is serialized by the GIL, and every request is a round trip to the
device process: on a small machine the two then compete for the same CPUs and for wake-ups.
Keeping them apart (nbdkit on some CPUs, the daemon on the others) was worth about +60 % at
4 KiB depth 32 on 2 CPUs (benchmarks/README.md).  Values:

    split      nbdkit on the first half of the CPUs it may use, the daemon on the rest
               (with socket=, vdpa= or pci= only nbdkit is placed: the device is not ours);
               on a single CPU nothing is placed
    none       leave it all to the scheduler
    A/B        explicit CPU lists, nbdkit's / the daemon's, e.g. 0/1 or 0-1/2-7 (B may be
               empty: 0-1/)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from vblk_core.errors import ConfigError

DEFAULT = "split"


@dataclass(frozen=True)
class Placement:
    """CPU sets, or None for "the scheduler decides"."""
    nbdkit: frozenset[int] | None
    daemon: frozenset[int] | None

    def describe(self) -> str:
        def show(cpus: frozenset[int] | None) -> str:
            return "any CPU" if cpus is None else "CPU " + ",".join(map(str, sorted(cpus)))
        return f"nbdkit on {show(self.nbdkit)}, daemon on {show(self.daemon)}"


def parse_cpu_list(text: str) -> frozenset[int]:
    """'0', '1-3', '0,2-3' -> CPU numbers.  Raises ValueError."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        first, last = int(lo), int(hi) if dash else int(lo)
        if first < 0 or last < first:
            raise ValueError(part)
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def resolve(value: str, available: frozenset[int] | None = None) -> Placement:
    """The placement ``value`` means on this machine (``available``: the CPUs this process may
    use).  Raises ConfigError naming placement= and the fix."""
    cpus = frozenset(os.sched_getaffinity(0)) if available is None else available
    if value == "none":
        return Placement(None, None)
    if value == "split":
        if len(cpus) < 2:
            return Placement(None, None)
        ordered = sorted(cpus)
        half = len(ordered) // 2
        return Placement(frozenset(ordered[:half]), frozenset(ordered[half:]))
    mine, slash, theirs = value.partition("/")
    try:
        if not slash:
            raise ValueError(value)
        nbdkit = parse_cpu_list(mine)
        daemon = parse_cpu_list(theirs) if theirs else None
    except ValueError:
        raise ConfigError(f"placement={value!r} is not understood: use split, none, or "
                          "NBDKIT_CPUS/DAEMON_CPUS such as 0/1 or 0-1/2-3") from None
    for name, chosen in (("nbdkit", nbdkit), ("daemon", daemon)):
        if chosen is not None and not chosen <= cpus:
            missing = ",".join(map(str, sorted(chosen - cpus)))
            raise ConfigError(f"placement={value}: CPU {missing} (for {name}) is not one this "
                              f"process may use ({','.join(map(str, sorted(cpus)))})")
    return Placement(nbdkit, daemon)


def pin_process(pid: int, cpus: frozenset[int]) -> int:
    """Pin every thread of process ``pid`` to ``cpus`` (threads created later inherit their
    creator's affinity).  Returns how many threads were pinned."""
    pinned = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
            pinned += 1
        except (ProcessLookupError, PermissionError):
            pass   # a thread that just ended, or one we may not touch
    return pinned
