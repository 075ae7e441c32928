"""What a benchmark result records about the machine, the tools and the code it ran with."""

import glob
import hashlib
import os
import platform
import shutil
import socket
import subprocess

from vblk_tools import ROOT


def _out(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def environment():
    """Host, CPUs, kernel, Python, the git commit (marked if the tree has changes) and the
    versions of nbdkit, qemu-storage-daemon and fio."""
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    git = _out(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _out(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    return {
        "hostname": socket.gethostname(), "ncpu": os.cpu_count(), "cpu_model": model,
        "kernel": platform.release(), "python": platform.python_version(),
        "git": git + (" (uncommitted changes)" if dirty else ""),
        "versions": {
            "nbdkit": _out(["nbdkit", "--version"]),
            "qemu-storage-daemon": _out(["qemu-storage-daemon", "--version"]).splitlines()[0]
            if shutil.which("qemu-storage-daemon") else "missing",
            "fio": _out(["fio", "--version"]),
        },
    }


def code_version(plugin):
    """Short hash of the plugin, the vblk_plugin package beside it and the vblk_core sources
    next to it (or in ROOT), so a report can tell when the code changed between runs (a fresh
    nbdkit loads the files every run)."""
    h = hashlib.sha1()
    core = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(plugin))), "vblk_core")
    if not os.path.isdir(core):
        core = os.path.join(ROOT, "vblk_core")
    package = os.path.join(os.path.dirname(os.path.abspath(plugin)), "vblk_plugin")
    files = ([plugin] + sorted(glob.glob(os.path.join(core, "*.py")))
             + sorted(glob.glob(os.path.join(package, "*.py"))))
    for f in files:
        try:
            with open(f, "rb") as fh:
                h.update(os.path.basename(f).encode() + b"\0" + fh.read())
        except OSError:
            pass
    return h.hexdigest()[:12]
