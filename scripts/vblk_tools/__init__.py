"""Code shared by the scripts (soak, bench, profile_plugin, bench_core.py) and the tests.

    venv.py      re-exec a script under the project venv (.venv)
    cli.py       parse_size and other argparse value types
    patterns.py  pattern (position-tagged test data), first_difference, assert_same_bytes
    harness.py   qemu-storage-daemon and nbdkit processes: started (argv from
                 vblk_plugin.qsd.qsd_argv), ready once they accept a connection, stopped by PID
    verify.py    model-checked libnbd I/O workers (soak and reliability tests)
    needs.py     the one check of what is installed: the missing programs, files and modules,
                 and the Debian package of each

May import the standard library, vblk_plugin (plugin/vblk_plugin) and, where a module says so,
psutil or libnbd's ``nbd``; never pytest and nothing under tests/.  Importing the package
puts the repository root and plugin/ on sys.path, so vblk_core and vblk_plugin import from
anywhere.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN_DIR = os.path.join(ROOT, "plugin")
for _path in (ROOT, PLUGIN_DIR):
    if _path not in sys.path:
        sys.path.append(_path)
