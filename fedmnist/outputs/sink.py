"""Where each round's record goes: one sink fanning out to `metrics.jsonl`, TensorBoard and checkpoints.

Each destination is a small release manager in the manner of `tff.program`'s: `release(record, state)`
once per round, `close()` at the end. The loop hands a round to `RunOutputs.release` and knows nothing
of files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import tensorflow_federated as tff

from fedmnist.outputs.checkpoint import Checkpoints
from fedmnist.outputs.metrics_log import MetricsLog
from fedmnist.outputs.records import RoundRecord
from fedmnist.outputs.tensorboard import TensorBoardLog, weight_arrays


class RoundReleaser(Protocol):
    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None: ...

    def close(self) -> None: ...


class MetricsRelease:
    """Appends the record to `metrics.jsonl`."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        self.log.append(record)

    def close(self) -> None:
        pass


class TensorBoardRelease:
    """The record's scalars every round; weight histograms every `histogram_every` rounds and in the last."""

    def __init__(self, board: TensorBoardLog, weight_names: list[str], histogram_every: int, last_round: int):
        self.board, self.weight_names = board, weight_names
        self.histogram_every, self.last_round = histogram_every, last_round

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        self.board.write(record.round, record.scalars())
        if self.histogram_every and (record.round == self.last_round or record.round % self.histogram_every == 0):
            self.board.write_histograms(record.round, weight_arrays(self.weight_names, weights))

    def close(self) -> None:
        self.board.close()


class CheckpointRelease:
    """Saves the server state every `every` rounds and in the last round."""

    def __init__(self, checkpoints: Checkpoints, every: int, last_round: int):
        self.checkpoints, self.every, self.last_round = checkpoints, every, last_round

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        if record.round == self.last_round or record.round % self.every == 0:
            self.checkpoints.save(state, record.round)

    def close(self) -> None:
        pass


class RunOutputs:
    """Every destination of a run's rounds, released in order: the log first, checkpoints last, so a
    checkpointed round is always logged."""

    def __init__(self, releasers: Sequence[RoundReleaser]):
        self.releasers = list(releasers)

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        for releaser in self.releasers:
            releaser.release(record, state, weights)

    def close(self) -> None:
        for releaser in self.releasers:
            releaser.close()


def run_outputs(run_dir: Path, board: TensorBoardLog, checkpoints: Checkpoints, weight_names: list[str],
                histogram_every: int, checkpoint_every: int, last_round: int) -> RunOutputs:
    """The standard outputs of a run directory."""
    return RunOutputs([
        MetricsRelease(MetricsLog(run_dir)),
        TensorBoardRelease(board, weight_names, histogram_every, last_round),
        CheckpointRelease(checkpoints, checkpoint_every, last_round),
    ])
