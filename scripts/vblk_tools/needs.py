"""The one check of what a test, a guest build or a tool needs installed: which programs, files
and Python modules are missing, and the Debian package that provides each.  Missing means a
failure that names the packages (the suite never skips).

    require({"nbdkit": "nbdkit", "/bin/busybox": "busybox-static"}, "the kernel client test",
            setup="scripts/setup --vm")              # raises Missing
    nbd = module("nbd", "python3-libnbd")

A need is a program name (looked up on PATH, or on ``path``), an absolute path (a glob pattern
may stand for a version or an architecture), or a module via ``module``.
"""
from __future__ import annotations

import glob
import importlib
import os
import shutil
from collections.abc import Mapping
from types import ModuleType

from vblk_plugin.qsd import QSD, daemon_package

#: The package of qemu-storage-daemon here (qemu-system-common on Debian 12, qemu-utils on 13).
QSD_PACKAGE = daemon_package() or "qemu-utils"
#: qemu-storage-daemon as a need (its package differs between the distributions).
QSD_NEED = {QSD: QSD_PACKAGE}
SETUP = "scripts/setup"


class Missing(RuntimeError):
    """Something needed is not installed; the message names it and the packages to install."""


def missing(needs: Mapping[str, str], path: str | None = None) -> list[str]:
    """"WHAT (package P)" for every need in ``needs`` (what -> package) that is not there."""
    out = []
    for what, package in needs.items():
        if what.startswith("/"):
            found = bool(glob.glob(what)) if glob.has_magic(what) else os.path.exists(what)
        else:
            found = shutil.which(what, path=path) is not None
        if not found:
            out.append(f"{what} (package {package})")
    return out


def explain(purpose: str, items: list[str], setup: str = SETUP) -> str:
    """One line: what ``purpose`` needs, and the apt-get command that installs it."""
    packages = sorted({i.rsplit("(package ", 1)[-1].rstrip(")") for i in items})
    return (f"{purpose} needs {', '.join(items)}: apt-get install {' '.join(packages)} "
            f"(or run {setup})")


def require(needs: Mapping[str, str], purpose: str, *, setup: str = SETUP,
            path: str | None = None) -> None:
    """Raises Missing naming every need of ``needs`` that is not installed."""
    items = missing(needs, path)
    if items:
        raise Missing(explain(purpose, items, setup))


def program(name: str, package: str, purpose: str = "this") -> str:
    """The full path of program ``name``.  Raises Missing naming ``package``."""
    require({name: package}, purpose)
    found = shutil.which(name)
    assert found is not None, "require() checked it"
    return found


def module(name: str, package: str, purpose: str = "this") -> ModuleType:
    """``import name``.  Raises Missing naming ``package``."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise Missing(explain(purpose, [f"Python module {name} (package {package})"])) from None
