"""Child processes this package starts: killed by the kernel when their parent dies."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

# Run by a fresh interpreter that then becomes the command: it asks the kernel to SIGKILL it when its parent
# dies (PR_SET_PDEATHSIG, kept across exec), makes sure that parent is still the one that started it, and
# execs the command. No Python code runs in a fork of this process: with `preexec_fn`, subprocess forks,
# gRPC's fork handlers run in the child, and one of them sometimes aborted it before exec (docs/measurements.md,
# "Worker start aborts"); without `preexec_fn`, subprocess starts the launcher without fork handlers.
_LAUNCHER = """\
import ctypes, os, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores them; subprocess gives its commands the defaults
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
ctypes.CDLL(None).prctl(1, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    os.kill(os.getpid(), signal.SIGKILL)
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as error:
    sys.stderr.write(f"cannot run {sys.argv[2]}: {error.strerror}\\n")
    os._exit(127)
"""


def dying_with_parent(command: Sequence[str]) -> list[str]:
    """`command` (its first element a path) for `subprocess.Popen`, started so that the kernel SIGKILLs it
    when this process dies, even by SIGKILL. The command keeps the process id Popen reports."""
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *map(str, command)]


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
