"""``vblk``, the command (also ``python3 -m vblk_plugin``), in the conventions of nbdinfo and
lsblk:

    vblk info socket=PATH | vdpa=DEV | pci=ADDR [--json] [--timeout S]
                                                           what the device is (one session)
    vblk stats FILE [--interval S] [--count N]             the plugin's stats= file, live
    vblk plugin-path                                       the nbdkit plugin file to run
    vblk --version

A problem is one line on stderr naming it and the fix, and exit status 1 (2 for a usage
error, as argparse does).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from vblk_core import VblkError, __version__
from vblk_core.errors import ConfigError

from . import config as config_mod
from . import users
from .examine import INFO_TIMEOUT, examine

PROG = "vblk"
#: The keys ``vblk info`` takes: the devices a session can be opened on directly.
INFO_KEYS = ("socket", "vdpa", "pci")


def plugin_path() -> str:
    """The nbdkit plugin file of this installation (vblk_plugin/nbdkit_plugin.py)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbdkit_plugin.py")


def _device_config(arg: str) -> config_mod.PluginConfig:
    """The PluginConfig for ``vblk info``'s one KEY=VALUE, checked as the plugin checks it.
    Raises ConfigError with the fix."""
    key, sep, value = arg.partition("=")
    if not sep or key not in INFO_KEYS:
        hint = (" (image= starts a daemon: run qemu-img info on the image instead)"
                if key == "image" else "")
        raise ConfigError(f"{arg!r} is not a device: give socket=PATH (a vhost-user-blk "
                          "back-end), vdpa=/dev/vhost-vdpa-N or pci=DOMAIN:BUS:SLOT.FN" + hint)
    cfg = config_mod.PluginConfig()
    cfg.set(key, value)
    cfg.complete()
    return cfg


def cmd_info(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 600:
        raise ConfigError(f"--timeout {args.timeout:g}: give more than 0, up to 600 seconds")
    cfg = _device_config(args.device)
    key = config_mod.device_key(cfg)
    assert key is not None, "complete() ensures a device"
    value = str(getattr(cfg, key))
    transport, target = config_mod.device_target(cfg)
    try:
        report = examine(config_mod.connector(cfg, timeout=args.timeout), transport, target,
                         args.timeout)
    except VblkError as e:
        if users.is_busy(e):
            raise ConfigError(users.busy_message(key, value, e)) from None
        raise ConfigError(f"{key}={value}: {e}") from None
    sys.stdout.write(report.as_json_text() if args.json else report.as_text())
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from .statsview import watch
    if args.interval <= 0 or args.interval > 3600:
        raise ConfigError(f"--interval {args.interval:g}: give 0.1 to 3600 seconds")
    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count {args.count}: give 1 or more")
    parent = os.path.dirname(os.path.abspath(args.file))
    if not os.path.isdir(parent):
        raise ConfigError(f"{args.file}: directory {parent} does not exist: give the path "
                          "nbdkit's stats= key names")
    try:
        watch(args.file, args.interval, args.count)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_plugin_path(args: argparse.Namespace) -> int:
    print(plugin_path())
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Inspect virtio-blk devices (vhost-user, vhost-vdpa, vfio-pci) "
        "and watch vblk's nbdkit plugin.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="what a device is, from one short session",
                          description="What a virtio-blk device is, from one short session: "
                          "features, capacity, block sizes, limits, queues, serial.")
    info.add_argument("device", metavar="socket=PATH|vdpa=DEV|pci=ADDR",
                      help="the device, as the plugin's key names it")
    info.add_argument("--json", action="store_true", help="one JSON object (stable keys)")
    info.add_argument("--timeout", type=float, default=INFO_TIMEOUT, metavar="S",
                      help="seconds each answer of the device may take (default "
                      f"{INFO_TIMEOUT:g}; a vhost-user back-end busy with another front-end "
                      "never answers)")
    info.set_defaults(run=cmd_info)
    stats = sub.add_parser("stats", help="the plugin's stats= file as a live view",
                           description="The plugin's stats= file as a live view, like iostat.")
    stats.add_argument("file", metavar="FILE", help="the path given to the plugin's stats=")
    stats.add_argument("--interval", type=float, default=1.0, metavar="S",
                       help="seconds between reports (default 1)")
    stats.add_argument("--count", type=int, default=None, metavar="N",
                       help="stop after N reads of the file (default: until Ctrl-C)")
    stats.set_defaults(run=cmd_stats)
    path = sub.add_parser("plugin-path", help="the nbdkit plugin file to run",
                          description='The nbdkit plugin file: nbdkit python "$(vblk '
                          'plugin-path)" socket=...')
    path.set_defaults(run=cmd_plugin_path)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status (1: a problem, said in one line on stderr)."""
    args = parser().parse_args(argv)
    try:
        status: int = args.run(args)
        return status
    except VblkError as e:
        print(f"{PROG} {args.command}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # `vblk stats ... | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
