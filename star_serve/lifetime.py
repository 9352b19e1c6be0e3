"""How a helper process (the engine's, the adaptation's) ends with the serving process that started it."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """On Linux, have the kernel kill this process when the thread that started it ends, however it ends (a kill
    of the serving process included)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
