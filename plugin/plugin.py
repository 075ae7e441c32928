# vblk's nbdkit plugin, run from a checkout (no install needed):
#
#   nbdkit -f -U /tmp/vblk.sock python plugin/plugin.py socket=/tmp/vhost.sock
#
# The callbacks themselves are in plugin/vblk_plugin/nbdkit_plugin.py, the one copy: an
# installed vblk ships that module, and `vblk plugin-path` prints its path.  This file only
# makes vblk_plugin importable from here and re-exports those callbacks for nbdkit (which looks
# them up in this module).  The keys are documented in README.md ("Configuration keys").

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from vblk_plugin.nbdkit_plugin import *  # noqa: E402,F403
