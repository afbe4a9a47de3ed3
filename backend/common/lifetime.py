"""A child process's life tied to its parent's (Linux's PR_SET_PDEATHSIG)."""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)


def die_with_parent(parent_pid: int, component: str) -> bool:
    """Have Linux send this process SIGTERM when its parent ends (PR_SET_PDEATHSIG), so
    a child whose parent was killed stops instead of running on as an orphan. False when
    the parent is already gone (the caller exits). Elsewhere a no-op. `component` names
    the process in the warning logged when the kernel refuses (`[Worker]`)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.warning("%s prctl(PR_SET_PDEATHSIG) failed (errno %d); this process "
                        "outlives its parent if that is killed", component, ctypes.get_errno())
    return os.getppid() == parent_pid  # it may have ended before prctl took effect
