"""Tie a process's life to its parent's, so that no evaluation outlives the daemon and holds the GPU."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send us `sig` when our parent dies (even by SIGKILL).

    Linux only (prctl); elsewhere the daemon's process-group kill still covers ordinary stops. If the parent
    is already gone (it died before prctl took effect, and we were re-parented), exit at once.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)
