"""A run directory in use is locked: one command at a time trains, resumes or overwrites it.

The lock is `fcntl.flock` on `RUN_DIR/.lock`, held by the process for as long as it uses the directory: the
kernel drops it when the process ends however it ends (a kill -9 included), so no lock is ever stale.
The file holds the holder's process id, for the message the next command prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from fedmnist.errors import UsageError

LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
_held: dict[Path, int] = {}  # directories this process holds, and how many times


def looks_like_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


@contextlib.contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Holds `run_dir`'s lock (again, if this process holds it already); a UsageError naming the process
    that holds it otherwise."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _take(fd):
            raise in_use(run_dir, _holder_of(fd))
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = 1
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)


def _take(fd: int, patience: float = 0.2) -> bool:
    """Takes the exclusive lock, or says it is held. Tries for `patience` seconds: `holder()` holds a shared
    lock for an instant to look, which must not turn a free directory away."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def holder(run_dir: Path) -> str | None:
    """The process that holds `run_dir`'s lock, or None when no process does (the lock is not taken)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder_of(fd)
    finally:
        os.close(fd)  # releases the shared lock, if it was taken


def in_use(run_dir: Path, holder: str) -> UsageError:
    return UsageError(f"run directory {run_dir} is in use by process {holder}; wait for it to end or stop it, "
                      f"then try again")


def _holder_of(fd: int) -> str:
    return os.read(fd, 64).decode(errors="replace").strip() or "another process"


def clear(run_dir: Path) -> None:
    """Removes everything in `run_dir` but its lock (the caller holds it)."""
    import shutil

    for entry in Path(run_dir).iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def has_rounds(run_dir: Path) -> bool:
    """Whether any round of the run was logged."""
    metrics = Path(run_dir) / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0
