"""``vblk stats FILE``: the plugin's stats= file (stats.py writes it) as a live view, refreshed
like iostat: per queue and in total, requests/s, MB/s, depth, errors, kicks and calls per
request, with the device's state and reconnects.

The file is read every ``interval`` seconds and opened anew each time (the writer replaces it
by a rename, once a second); each new write is compared with the previous one, over the time
between the two writes (the file's modification times), so a reader faster than the writer
shows no false idle intervals.  A missing, half-written or non-JSON file is waited for; a file
no longer rewritten is called stale.  A new nbdkit behind the file (the process whose command
line names it with stats=, found in /proc) or counters that went backwards start the view
again from the new counters, saying so.  ``StatsView`` is pure (tests feed it snapshots);
``watch`` is the loop around it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from .users import nbdkit_users

Snapshot = dict[str, Any]
#: The counters rates are computed from (the writer's per-queue and "totals" keys).
COUNTERS = ("requests", "bytes", "errors", "kicks", "calls")
#: A file older than this is stale (the plugin rewrites it every second).
STALE_SECONDS = 5.0
HEADER = (f"{'queue':>6} {'req/s':>10} {'MB/s':>9} {'depth':>6} {'max':>5} {'errors':>7} "
          f"{'kicks/req':>10} {'calls/req':>10}")


def read_snapshot(path: str) -> tuple[Snapshot | None, float, str]:
    """(the stats file's content, when it was written, "") or (None, 0, why it cannot be
    used now)."""
    try:
        with open(path) as f:
            written = os.fstat(f.fileno()).st_mtime
            data = json.load(f)
    except FileNotFoundError:
        return None, 0.0, "no such file yet (is nbdkit running with stats=" + path + "?)"
    except (OSError, UnicodeDecodeError) as e:
        return None, 0.0, f"cannot read it: {getattr(e, 'strerror', None) or e}"
    except json.JSONDecodeError:
        return None, 0.0, "not JSON (being written?)"
    if not isinstance(data, dict) or not isinstance(data.get("queues"), list) \
            or not isinstance(data.get("totals"), dict):
        return None, 0.0, "not a vblk stats file (no queues and totals)"
    return data, written, ""


def writer_pid(path: str) -> int | None:
    """The PID of the nbdkit writing ``path`` (its command line has stats=PATH), if one is
    running where /proc shows it."""
    found = nbdkit_users("stats", path)
    return found[0].pid if found else None


def _rows(snap: Snapshot) -> dict[str, dict[str, Any]]:
    rows = {str(q.get("index", i)): q for i, q in enumerate(snap["queues"])}
    rows["all"] = snap["totals"]
    return rows


def _went_backwards(old: Snapshot, new: Snapshot) -> bool:
    old_rows, new_rows = _rows(old), _rows(new)
    if old_rows.keys() != new_rows.keys():
        return True
    return any(_count(new_rows[r], k) < _count(old_rows[r], k)
               for r in new_rows for k in COUNTERS) or \
        int(new.get("reconnects") or 0) < int(old.get("reconnects") or 0)


def _count(row: dict[str, Any], key: str) -> int:
    value = row.get(key, 0)
    return value if isinstance(value, int) else 0


def _per_request(count: int, requests: int) -> str:
    return f"{count / requests:10.2f}" if requests else f"{'-':>10}"


class StatsView:
    """Turns successive snapshots into reports (lists of lines)."""

    def __init__(self) -> None:
        self.previous: Snapshot | None = None
        self.previous_time = 0.0
        self.previous_writer: int | None = None
        self.rebase_next = False
        self.problem = ""

    def update(self, snap: Snapshot | None, written: float, problem: str = "",
               writer: int | None = None) -> list[str]:
        """The lines to print for this read: ``snap`` written at ``written`` (seconds) by the
        process ``writer`` (None: unknown); ``snap`` None: the file could not be used,
        ``problem`` says why (said once until it changes).  Nothing if the file has not been
        rewritten since the last read."""
        stamp = time.strftime("%H:%M:%S", time.localtime())
        if snap is None:
            if problem == self.problem:
                return []
            self.problem = problem
            return [f"{stamp}  waiting: {problem}"]
        self.problem = ""
        old, old_time, old_writer = self.previous, self.previous_time, self.previous_writer
        if old is not None and written == old_time:
            return []
        self.previous, self.previous_time = snap, written
        self.previous_writer = writer if writer is not None else old_writer
        status = _status(snap, self.previous_writer)
        if old is None:
            return [f"{stamp}  {status}; first report at its next write"]
        if writer is not None and old_writer is not None and writer != old_writer:
            # The write just read may still be the last one of the nbdkit before: the new
            # one's next write is the baseline.
            self.rebase_next = True
            return [f"{stamp}  counters restarted (a new nbdkit): {status}"]
        if self.rebase_next:
            self.rebase_next = False
            return []
        if _went_backwards(old, snap):
            return [f"{stamp}  counters restarted (a new nbdkit): {status}"]
        seconds = max(written - old_time, 1e-6)
        lines = [f"{stamp}  {status}", HEADER]
        old_rows = _rows(old)
        for name, row in _rows(snap).items():
            delta = {k: _count(row, k) - _count(old_rows[name], k) for k in COUNTERS}
            lines.append(f"{name:>6} {delta['requests'] / seconds:10.1f} "
                         f"{delta['bytes'] / seconds / 1e6:9.2f} {_count(row, 'in_flight'):6d} "
                         f"{_count(row, 'max_depth'):5d} {delta['errors']:7d} "
                         f"{_per_request(delta['kicks'], delta['requests'])} "
                         f"{_per_request(delta['calls'], delta['requests'])}")
        return lines


def _status(snap: Snapshot, writer: int | None) -> str:
    text = f"nbdkit pid {writer}, " if writer is not None else ""
    text += f"state {snap.get('state', '?')}, reconnects {snap.get('reconnects', 0)}"
    if snap.get("failure"):
        text += f", failure: {snap['failure']}"
    if "bounce_buffers_in_use" in snap:
        text += (f", bounce buffers in use {snap['bounce_buffers_in_use']} "
                 f"(high {snap.get('bounce_buffers_high_water', '?')})")
    return text


def watch(path: str, interval: float, count: int | None = None, out: TextIO = sys.stdout,
          sleep: Callable[[float], None] = time.sleep) -> None:
    """Read the file every ``interval`` seconds, ``count`` times in all (None: until
    interrupted), printing what each read shows."""
    view = StatsView()
    reads = 0
    path = os.path.abspath(path)
    print(f"vblk stats {path}: every {interval:g} s (Ctrl-C to stop)", file=out, flush=True)
    while count is None or reads < count:
        if reads:
            sleep(interval)
        snap, written, problem = read_snapshot(path)
        writer = writer_pid(path)
        if snap is not None:
            age = time.time() - written
            if age > STALE_SECONDS and writer is None:
                snap, problem = None, (f"not rewritten for {age:.0f} s and no nbdkit with "
                                       "stats= naming it is running")
            elif age > STALE_SECONDS:
                snap, problem = None, (f"not rewritten for {age:.0f} s (nbdkit pid {writer} "
                                       "rewrites it every second: is it stuck?)")
        for line in view.update(snap, written, problem, writer):
            print(line, file=out, flush=True)
        reads += 1
