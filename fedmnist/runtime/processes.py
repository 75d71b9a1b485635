"""Child processes this package starts: killed by the kernel when their parent dies."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

# A fresh interpreter runs the setup code, then becomes the command (os.execv: same process id). No Python code
# runs in a fork of this process: with `preexec_fn`, subprocess forks, gRPC's fork handlers run in the child,
# and one of them sometimes aborted it before exec (docs/measurements.md, "Worker start aborts"); without
# `preexec_fn`, subprocess starts the interpreter without fork handlers.
_BEFORE = """\
import ctypes, os, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores them; subprocess gives its commands the defaults
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
"""
_EXEC = """
try:
    os.execv(sys.argv[1], sys.argv[1:])
except OSError as error:
    sys.stderr.write(f"cannot run {sys.argv[1]}: {error.strerror}\\n")
    os._exit(127)
"""


def exec_after(code: str, command: Sequence[str]) -> list[str]:
    """`command` (its first element a path) for `subprocess.Popen`, run after `code` (Python, with `ctypes`,
    `os`, `signal` and `sys` imported): what `preexec_fn` would do, without running Python in a fork of this
    process. A command that cannot run exits 127 with one line on stderr."""
    return [sys.executable, "-I", "-S", "-c", _BEFORE + code + _EXEC, *map(str, command)]


def dying_with_parent(command: Sequence[str]) -> list[str]:
    """`command`, started so that the kernel SIGKILLs it when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG, kept across exec; and if this process died before it was set, at once)."""
    return exec_after(f"ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
                      f"if os.getppid() != {os.getpid()}:\n"
                      f"    os.kill(os.getpid(), signal.SIGKILL)", command)


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
