"""Server state saved after rounds, with TFF's own `tff.program.FileProgramStateManager`.

Checkpoints live in `RUN_DIR/checkpoints/round_N` (SavedModel format). Loading checks every value's
shape and dtype against the process's own initial state, so a checkpoint from another model or
config is named instead of failing later; an unreadable or mismatched newest checkpoint is moved
aside (kept, renamed `corrupt-round_N`) and the newest intact one is used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.errors import CheckpointError

DIRECTORY = "checkpoints"
PREFIX = "round_"


def _run(coroutine):
    """Runs a coroutine to completion, also from inside a running event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@contextlib.contextmanager
def _quiet_tensorflow_logger():
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        yield
    finally:
        logger.setLevel(level)


def _signature(structure: Any) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(np.shape(v)), np.asarray(v).dtype.str) for v in tf.nest.flatten(structure)]


class Checkpoints:
    def __init__(self, run_dir: Path, keep: int = 3):
        self.root = Path(run_dir) / DIRECTORY
        self.manager = tff.program.FileProgramStateManager(
            root_dir=str(self.root), prefix=PREFIX, keep_total=keep, keep_first=False)
        self.remove_partial()

    def remove_partial(self) -> None:
        """Removes what an interrupted save left: TFF writes each checkpoint into `round_N_tempXXXX` and
        renames it when whole, so such a directory is never a checkpoint."""
        if self.root.is_dir():
            for partial in self.root.glob(f"{PREFIX}*_temp*"):
                shutil.rmtree(partial, ignore_errors=True)

    def rounds(self) -> list[int]:
        return _run(self.manager.get_versions()) or []

    def save(self, state: Any, round_num: int) -> None:
        try:
            with _quiet_tensorflow_logger():  # SavedModel logs "Assets written to: <path>" at INFO
                _run(self.manager.save(state, round_num))
        except (tf.errors.OpError, OSError) as error:
            self.remove_partial()
            reason = getattr(error, "strerror", None) or str(getattr(error, "message", error)).split("; ")[-1]
            raise CheckpointError(f"cannot save checkpoint {PREFIX}{round_num} in {self.root}: {reason}; "
                                  f"free disk space, then resume the run") from error

    def _load(self, round_num: int, structure: Any) -> Any:
        mismatch = CheckpointError(f"checkpoint {PREFIX}{round_num} does not match this run's model and "
                                   f"optimizers (other shapes or types)")
        try:
            state = _run(self.manager.load(round_num, structure))
        except (ValueError, TypeError) as error:  # read, but its structure is not this run's
            raise mismatch from error
        except Exception as error:  # noqa: BLE001 - SavedModel raises many kinds; all mean unreadable.
            raise CheckpointError(f"checkpoint {PREFIX}{round_num} is unreadable "
                                  f"({type(error).__name__})") from error
        if _signature(state) != _signature(structure):
            raise mismatch
        return state

    def load_latest(self, structure: Any, warn: Callable[[str], None]) -> tuple[Any, int]:
        """The newest intact checkpoint as `(state, round)`; `(None, 0)` when there is none.

        Newer broken checkpoints are renamed aside only once an intact one is found; when none is
        intact nothing is touched and the first problem is raised.
        """
        broken: list[tuple[int, CheckpointError]] = []
        for round_num in reversed(self.rounds()):
            try:
                state = self._load(round_num, structure)
            except CheckpointError as error:
                broken.append((round_num, error))
                continue
            for bad_round, error in broken:
                self._set_aside(bad_round)
                warn(f"warning: {error}; kept as corrupt-{PREFIX}{bad_round}, resuming from round {round_num}")
            return state, round_num
        if broken:
            raise CheckpointError(f"{broken[0][1]}, and no older checkpoint is usable")
        return None, 0

    def _set_aside(self, round_num: int) -> None:
        source = self.root / f"{PREFIX}{round_num}"
        target = self.root / f"corrupt-{PREFIX}{round_num}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.root / f"corrupt-{PREFIX}{round_num}-{suffix}"
        source.rename(target)
