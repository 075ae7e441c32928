"""``python3 -m vblk_plugin``: the ``vblk`` command (cli.py)."""
import sys

from .cli import main

sys.exit(main())
