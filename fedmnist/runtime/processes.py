"""Child processes this package starts: killed by the kernel when their parent dies."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

_PR_SET_PDEATHSIG = 1
# Resolved here, not in the child: between fork and exec the child must not load libraries (a lock
# another thread of this process held at the fork would never be released there).
_prctl = ctypes.CDLL(None).prctl


def die_with_parent() -> None:
    """For `subprocess.Popen(preexec_fn=...)`: runs in the child between fork and exec and asks the
    kernel to SIGKILL it when the parent dies, even by SIGKILL."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_children() -> list[int]:
    """Process ids of `worker_binary` processes whose parent is this process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"worker_binary" in cmdline:
            pids.append(int(entry.name))
    return pids
