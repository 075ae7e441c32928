"""One harness for the tests, scripts/soak and the benchmarks: start qemu-storage-daemon (its
argv from the one definition, ``vblk_plugin.qsd.qsd_argv``) and nbdkit, wait until each is
ready by connecting to it, and stop them by PID.

    qsd = Qsd(workdir, size=64 << 20, num_queues=4).start()      # vhost-user-blk back-end
    kit = Nbdkit(workdir, [f"socket={qsd.socket}"], stats=True).start()
    h = kit.connect()                                            # libnbd handle
    ...
    kit.stop(); qsd.stop()                                       # or cleanup()

Ready means: the daemon's unix socket accepts a connection (a vhost-user back-end takes the
next front-end after the probe disconnects), and nbdkit (or an NBD export) sends the NBD
greeting, which nbdkit does only once the plugin's after_fork has run.  A file existing proves
neither.

Every process is started by ``spawn``: in its own session (a terminal ^C reaches only the
harness), with a parent-death signal so nothing outlives the harness even if it is killed, and
is stopped only by its own PID (our unreaped child, so the PID cannot have been reused).
No pytest import: failures are HarnessError.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket as _socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Self

from vblk_plugin.qsd import QSD, Node, accepts_connection, missing_daemon_hint, qsd_argv

from . import ROOT

PLUGIN = Path(ROOT) / "plugin" / "plugin.py"
NBDKIT = "nbdkit"
SETPRIV = shutil.which("setpriv")
UNIX_PATH_MAX = 100          # sun_path is 108 bytes; stay clear of it
MiB = 1 << 20
PathLike = str | os.PathLike[str]


class HarnessError(RuntimeError):
    """A process did not start or stop as expected (the message includes its log)."""


class Exit(NamedTuple):
    status: int | None       # exit status (negative: killed by that signal); None: not running
    seconds: float           # time the stop took
    in_time: bool            # exited within the timeout (else it was SIGKILLed)


# --- processes -----------------------------------------------------------------------------

_live: list[subprocess.Popen[bytes]] = []   # started here and not yet stopped, oldest first
#: every argv spawned in this process, oldest first (the tests check each daemon's command line)
history: list[list[str]] = []
_PR_SET_PDEATHSIG = 1


def _prctl_death_signal(sig: int) -> Callable[[], None]:
    def setup() -> None:   # in the child, between fork and exec (only without setpriv)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return setup


def spawn(argv: Sequence[PathLike], log_path: PathLike | None = None, *,
          extra_env: Mapping[str, str] | None = None, cwd: PathLike | None = None,
          death_signal: str = "KILL") -> subprocess.Popen[bytes]:
    """Start ``argv`` with stdout+stderr appended to ``log_path`` (after a "--- start" line;
    DEVNULL without one), in its own session, with parent-death signal ``death_signal``.
    The PID is the program's own (setpriv execs it)."""
    cmd = [os.fspath(a) for a in argv]
    preexec = None
    if SETPRIV:
        cmd = [SETPRIV, f"--pdeathsig={death_signal}", "--", *cmd]
    else:
        preexec = _prctl_death_signal(getattr(signal, "SIG" + death_signal))
    env = None
    if extra_env:
        env = {**os.environ, **extra_env}
    _live[:] = [p for p in _live if p.returncode is None]
    history.append(cmd)
    if log_path is None:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                                env=env, preexec_fn=preexec)
    else:
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd,
                                    env=env, preexec_fn=preexec)
    _live.append(proc)
    return proc


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> Exit:
    """Send ``sig`` to our child ``proc`` (by PID), wait up to ``timeout``, then SIGKILL."""
    if proc is None:
        return Exit(None, 0.0, True)
    t0 = time.monotonic()
    in_time = True
    if proc.poll() is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            in_time = False
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _live:
        _live.remove(proc)
    return Exit(proc.returncode, time.monotonic() - t0, in_time)


def stop_all(timeout: float = 5.0) -> None:
    """Stop everything spawned here that still runs, newest first (nbdkit before the daemon
    behind it).  For atexit and signal handlers."""
    for proc in reversed(list(_live)):
        stop_process(proc, signal.SIGTERM, timeout)


def log_tail(path: PathLike, chars: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --- readiness -----------------------------------------------------------------------------

def nbd_greeting(path: PathLike, timeout: float = 5.0) -> bool:
    """True if an NBD server on the unix socket ``path`` sends its greeting (then we hang up
    before any option: the plugin is not even opened)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(os.fspath(path))
        data = b""
        while len(data) < 8:
            chunk = s.recv(8 - len(data))
            if not chunk:
                return False
            data += chunk
        return data == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        s.close()


def wait_ready(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float,
               what: str, log_path: PathLike) -> None:
    """Poll ``ready()`` until it holds.  Raises HarnessError (with the log) if ``proc`` exits
    first, or after ``timeout`` seconds (``proc`` is then stopped)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            stop_process(proc)
            raise HarnessError(f"{what} exited with status {proc.returncode} before it was "
                               f"ready:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            stop_process(proc)
            raise HarnessError(f"{what} was not ready within {timeout:g}s:\n"
                               f"{log_tail(log_path)}")
        time.sleep(0.01)


def chain_without_discard(argv: Sequence[str]) -> list[str]:
    """The block nodes between a qemu-storage-daemon's export and its image (the format node,
    any filters, the file node) that lack ``discard=unmap``, as "node-name (driver)": an empty
    list when trims can reach the image.  (qemu's default discard=ignore on any one of them
    completes every trim without effect.)  Raises ValueError for an argv without an export."""
    nodes: dict[str, dict[str, str]] = {}
    export = None
    args = list(argv)
    for flag, value in zip(args, args[1:], strict=False):
        if flag not in ("--blockdev", "--export"):
            continue
        opts = dict(kv.split("=", 1) for kv in value.replace(",,", "\0").split(",") if "=" in kv)
        if flag == "--blockdev":
            nodes[opts.get("node-name", "")] = opts
        else:
            export = opts.get("node-name")
    if export is None:
        raise ValueError(f"no --export in {' '.join(args)}")
    missing = []
    name: str | None = export
    seen = set()
    while name is not None and name in nodes and name not in seen:
        seen.add(name)
        opts = nodes[name]
        if opts.get("discard") != "unmap":
            missing.append(f"{name} ({opts.get('driver')})")
        name = opts.get("file")
    return missing


# --- files ---------------------------------------------------------------------------------

def private_dir(prefix: str = "vblk-") -> Path:
    """A fresh private directory with a short path, for unix sockets (sun_path holds 108
    bytes; a checkout's or pytest's directories may be deeper): the caller removes it.  In
    /tmp itself, not $TMPDIR, which may be just as deep."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def short_socket_dir(directory: PathLike, name_len: int = 20) -> tuple[Path, bool]:
    """(``directory``, False) if unix socket paths in it fit, else (a fresh ``private_dir``,
    True): the caller removes it."""
    d = Path(directory)
    if len(str(d)) + name_len < UNIX_PATH_MAX:
        return d, False
    return private_dir(), True


def make_image(path: PathLike, size: int, content: bytes | None = None) -> Path:
    """A sparse raw image of ``size`` bytes (reads as zeroes) starting with ``content``."""
    with open(path, "wb") as f:
        f.truncate(size)
        if content:
            f.write(content)
    return Path(path)


def nbd_uri(socket: PathLike) -> str:
    return f"nbd+unix:///?socket={os.fspath(socket)}"


# --- qemu-storage-daemon -------------------------------------------------------------------

class _ServerProcess:
    """What Qsd and Nbdkit share: a process serving on a unix socket."""

    socket: str
    proc: subprocess.Popen[bytes] | None

    @property
    def uri(self) -> str:
        return nbd_uri(self.socket)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Qsd(_ServerProcess):
    """qemu-storage-daemon serving an image on a unix socket (vhost-user-blk, or NBD with
    ``export="nbd"``); killable and restartable on the same socket and image.

    Without ``image`` a sparse one of ``size`` bytes (starting with ``content``) is made in
    ``workdir``.  The socket goes to ``socket`` or into ``socket_dir`` (default ``workdir``;
    a private /tmp directory if the path would be too long for a unix socket).  The other
    options are those of ``qsd_argv``."""

    def __init__(self, workdir: PathLike, *, name: str = "qsd", image: PathLike | None = None,
                 size: int = 64 * MiB, content: bytes | None = None,
                 socket: PathLike | None = None, socket_dir: PathLike | None = None,
                 log_path: PathLike | None = None, num_queues: int = 1, writable: bool = True,
                 aio: str = "threads", fmt: str = "raw", logical_block_size: int | None = None,
                 export: str = "vhost-user-blk", filters: Sequence[Node] = (),
                 extra_nodes: Sequence[Node] = (), write_log: bool | PathLike = False,
                 prefix: Sequence[str] = (), death_signal: str = "KILL") -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.write_log: Path | None = None
        if write_log:
            # blklogwrites between the file node and the format node: every write, flush, FUA
            # and discard the file node gets is logged (tests/dmlog.py reads it)
            self.write_log = (Path(write_log) if write_log is not True
                              else self.workdir / f"{name}-writes.log")
            self.write_log.write_bytes(b"")
            extra_nodes = (*extra_nodes, Node("file", "wlog0",
                                              {"filename": os.fspath(self.write_log)}))
            filters = (Node("blklogwrites", "wlw0", {"log": "wlog0"}), *filters)
        self.prefix = [os.fspath(a) for a in prefix]
        self.image = (Path(image) if image is not None
                      else make_image(self.workdir / f"{name}.img", size, content))
        self._own_dir: Path | None = None
        if socket is None:
            sdir, own = short_socket_dir(socket_dir or self.workdir)
            if own:
                self._own_dir = sdir
            socket = sdir / f"{name}.{'sock' if export == 'vhost-user-blk' else 'nbd'}"
        self.socket = os.fspath(socket)
        self.log_path = Path(log_path) if log_path else self.workdir / f"{name}.log"
        self.options: dict[str, Any] = dict(
            fmt=fmt, aio=aio, num_queues=num_queues, writable=writable,
            logical_block_size=logical_block_size, export=export, filters=tuple(filters),
            extra_nodes=tuple(extra_nodes))
        self.num_queues = num_queues
        self.writable = writable
        self.export = export
        self.death_signal = death_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def command(self, image: PathLike | None = None) -> list[str]:
        """The argv: ``prefix`` (e.g. a wrapper that mounts something first and execs the
        rest), then qsd_argv's."""
        return self.prefix + qsd_argv(image if image is not None else self.image, self.socket,
                                      **self.options)

    def start(self, timeout: float = 15.0, image: PathLike | None = None) -> Self:
        """Start (again) and wait until the socket accepts a connection.  ``image`` serves
        another image on the same socket (a different device)."""
        if self.running:
            raise HarnessError(f"{QSD} {self.name} already running (pid {self.pid})")
        if shutil.which(QSD) is None:
            raise HarnessError(f"{QSD} is not installed: {missing_daemon_hint()}")
        if self.write_log is not None and self.starts:
            self.write_log.write_bytes(b"")   # a fresh log per start (qemu writes a new super)
        try:
            os.unlink(self.socket)  # a stale socket of a killed daemon
        except FileNotFoundError:
            pass
        proc = self.proc = spawn(self.command(image), self.log_path,
                                 death_signal=self.death_signal)
        self.starts += 1
        if self.export == "nbd":
            def ready() -> bool:
                return nbd_greeting(self.socket)
        else:
            def ready() -> bool:
                return accepts_connection(self.socket)
        try:
            wait_ready(proc, ready, timeout, f"{QSD} on {self.socket}", self.log_path)
        except HarnessError as e:
            self.proc = None
            raise HarnessError(f"{e}\ncommand: {' '.join(self.command(image))}") from None
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, SIGKILL after ``timeout``.  Returns the exit status (None if it was
        not running)."""
        status = stop_process(self.proc, signal.SIGTERM, timeout).status
        self.proc = None
        return status

    def kill(self) -> int | None:
        """SIGKILL (a crash), reaped; the socket file stays behind, as after a real crash."""
        if self.proc is None:
            return None
        status = stop_process(self.proc, signal.SIGKILL, 10.0).status
        self.proc = None
        self.kills += 1
        return status

    def restart(self, timeout: float = 15.0) -> Self:
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def read_image(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.image, "rb") as f:
            f.seek(offset)
            return f.read(-1 if length is None else length)

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __repr__(self) -> str:
        return f"<Qsd {self.name} pid={self.pid} socket={self.socket}>"


# --- nbdkit --------------------------------------------------------------------------------

class Nbdkit(_ServerProcess):
    """``nbdkit -f -U SOCK [-r] [-t N] [ARGS] PLUGIN KEY=VALUE...``.

    ``plugin``: a Python plugin's path (default plugin/plugin.py: vblk) or a C plugin's name
    ("file", "memory").  ``keys``: a mapping or "key=value" strings.  ``stats=True`` adds
    ``stats=WORKDIR/NAME-stats.json`` (vblk's stats file; ``stats()`` reads it), a string is
    the path itself.  ``start()`` returns once nbdkit sends the NBD greeting."""

    def __init__(self, workdir: PathLike, keys: Mapping[str, object] | Sequence[str] = (), *,
                 name: str = "nbdkit", plugin: PathLike = PLUGIN,
                 nbdkit_args: Sequence[str] = (), threads: int | None = None,
                 readonly: bool = False, extra_env: Mapping[str, str] | None = None,
                 stats: bool | PathLike = False, socket: PathLike | None = None,
                 log_path: PathLike | None = None, death_signal: str = "TERM",
                 cwd: PathLike | None = None) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.cwd = cwd   # nbdkit's working directory (default: ours)
        if isinstance(keys, Mapping):
            keys = [f"{k}={v}" for k, v in keys.items()]
        self.keys = list(keys)
        self.stats_path: Path | None = None
        if stats is True:
            self.stats_path = self.workdir / f"{name}-stats.json"
        elif stats:
            self.stats_path = Path(stats)
        if self.stats_path is not None:
            self.keys.append(f"stats={self.stats_path}")
        self.plugin = os.fspath(plugin)
        self.nbdkit_args = list(nbdkit_args)
        self.threads = threads
        self.readonly = readonly
        self.extra_env = dict(extra_env or {})
        self._own_dir: Path | None = None
        if socket is None:
            sdir, own = short_socket_dir(self.workdir)
            if own:
                self._own_dir = sdir
            socket = sdir / f"{name}.sock"
        self.socket = os.fspath(socket)
        self.log_path = Path(log_path) if log_path else self.workdir / f"{name}.log"
        self.death_signal = death_signal
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def command(self) -> list[str]:
        cmd = [NBDKIT, "-f", "-U", self.socket]
        if self.readonly:
            cmd.append("-r")
        if self.threads:
            cmd += ["-t", str(self.threads)]
        plugin = ["python", self.plugin] if self.plugin.endswith(".py") else [self.plugin]
        return cmd + self.nbdkit_args + plugin + self.keys

    def launch(self) -> subprocess.Popen[bytes]:
        """Start nbdkit without waiting for it (e.g. when it is expected to refuse).  Raises
        HarnessError if this one is still running (a second one would orphan it)."""
        if self.running:
            raise HarnessError(f"nbdkit {self.name} already running (pid {self.pid})")
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        self.returncode = None
        self.proc = spawn(self.command(), self.log_path, extra_env=self.extra_env,
                          cwd=self.cwd, death_signal=self.death_signal)
        return self.proc

    def expect_exit(self, timeout: float = 30.0) -> Exit:
        """Start nbdkit expecting it to refuse (a bad configuration) and wait up to
        ``timeout`` for it to exit.  Returns its Exit; ``status`` is None and ``in_time``
        False if it still ran then (it is stopped).  ``log_text()`` has what it said."""
        proc = self.launch()
        t0 = time.monotonic()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            return Exit(None, time.monotonic() - t0, False)
        self.returncode, self.proc = proc.returncode, None
        stop_process(proc)      # reaped already: only forgets it
        return Exit(self.returncode, time.monotonic() - t0, True)

    def start(self, timeout: float = 30.0) -> Self:
        proc = self.launch()
        try:
            wait_ready(proc, lambda: nbd_greeting(self.socket), timeout,
                       f"nbdkit on {self.socket}", self.log_path)
        except HarnessError:
            self.returncode, self.proc = proc.returncode, None
            raise
        return self

    def stop(self, timeout: float = 10.0) -> Exit:
        """SIGTERM, wait (SIGKILL after ``timeout``).  nbdkit runs the plugin's cleanup."""
        result = stop_process(self.proc, signal.SIGTERM, timeout)
        if self.proc is not None:
            self.returncode = result.status
        self.proc = None
        return result

    def kill(self) -> int | None:
        """SIGKILL nbdkit (by PID) and reap it."""
        if self.proc is not None:
            self.returncode = stop_process(self.proc, signal.SIGKILL, 10.0).status
            self.proc = None
        return self.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stats(self) -> dict[str, Any] | None:
        """The last stats JSON the plugin wrote (None if none yet)."""
        if self.stats_path is None:
            return None
        try:
            with open(self.stats_path) as f:
                data: dict[str, Any] = json.load(f)
                return data
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def wait_stats(self, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 10.0) -> dict[str, Any] | None:
        """Poll the stats file until ``predicate(stats)`` holds; returns the last stats read."""
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.stats()
            if st is not None and predicate(st):
                return st
            time.sleep(0.2)
        return st

    def connect(self, strict: bool = True) -> Any:
        """A libnbd handle connected to the export."""
        import nbd
        h = nbd.NBD()
        if not strict:
            h.set_strict_mode(0)
        h.connect_unix(self.socket)
        return h

    def cleanup(self) -> None:
        # nbdkit 1.32 waits for connected clients on SIGTERM: do not wait long for it here.
        self.stop(5.0)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __enter__(self) -> Self:
        # ``with kit:`` starts it; ``with kit.start():`` must not start a second nbdkit
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Nbdkit {self.name} pid={self.pid} socket={self.socket}>"
