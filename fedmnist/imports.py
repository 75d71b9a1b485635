"""Importing TensorFlow and TFF without paying Python's cyclic garbage collector for it.

TensorFlow and TFF leave about 415,000 objects behind as they import. The collector's full passes walk
all of them: several while they import, and again whenever a run's tracing has allocated enough
(docs/performance.md, "Garbage collection"). Those objects live as long as the process, so the commands
import them with the collector paused and then move them out of its passes (`gc.freeze`); everything
created later is collected as usual.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator

_frozen = False


@contextlib.contextmanager
def long_lived_imports() -> Iterator[None]:
    """What is imported inside the block is kept out of the collector's passes for the life of the process.

    For commands (`fedmnist train`, `reproduce`, the benchmark) and the test session, not for library use:
    whatever exists when the block ends is frozen, not collected before the process exits. Once per process:
    a later block only imports, since freezing again would keep an earlier run's garbage for good.
    """
    global _frozen
    if _frozen:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        _frozen = True
        gc.freeze()
        # Interpreter shutdown collects what is left before it clears modules; frozen objects would be
        # destroyed after, when their finalizers (TFF's) no longer find the modules they use.
        atexit.register(gc.unfreeze)
        if enabled:
            gc.enable()
