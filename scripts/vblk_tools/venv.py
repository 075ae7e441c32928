"""Run a script under the project venv: ``reexec_in_venv(__file__)`` as the first statement
after ``import sys, os`` (stdlib only here, since it runs before the venv is active).

If ROOT/.venv exists and this interpreter is not it, exec the venv's python on the same script
and arguments.  VBLK_NO_REEXEC=1 in the environment turns this off.
"""
from __future__ import annotations

import os
import sys

from . import ROOT

VENV = os.path.join(ROOT, ".venv")


def reexec_in_venv(script: str) -> None:
    python = os.path.join(VENV, "bin", "python")
    if (os.path.exists(python) and os.path.realpath(sys.prefix) != os.path.realpath(VENV)
            and not os.environ.get("VBLK_NO_REEXEC")):
        os.execv(python, [python, os.path.abspath(script), *sys.argv[1:]])
