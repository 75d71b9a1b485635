"""The resident memory of a whole process tree: a process and its descendants (TFF's workers)."""

from __future__ import annotations

import os
import threading

import psutil


class TreeMemory:
    """Samples the RSS of a process and all its descendants in a background thread.

    `peak` is the largest total seen while the `with` block ran; `current()` samples once.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        total = 0
        try:
            processes = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:   # a child that exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
