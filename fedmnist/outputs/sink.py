"""Where a run's results go: one sink fanning out to `metrics.jsonl`, TensorBoard, checkpoints and, at the
end, the model, `summary.json` and the curves.

Each destination is a small release manager in the manner of `tff.program`'s (`RunOutput`): `release`
once per round, `drop_after(r, warn)` when a run resumes after round r (what was written for later rounds
goes, and so does a record a crash cut short: `warn` says so),
`finish` once the rounds are done, `close` last. The loop hands its results to `RunOutputs` and knows
nothing of files. A new output is one class here (or in a module of its own) and one line in
`run_outputs`.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tensorflow_federated as tff

from fedmnist.errors import DamagedFileError, RunError
from fedmnist.outputs.checkpoint import Checkpoints
from fedmnist.outputs.metrics_log import MetricsLog, replace_with, write_json
from fedmnist.outputs.records import RoundRecord
from fedmnist.outputs.tensorboard import TensorBoardLog, drop_events_after, scalar_tags, weight_arrays
from fedmnist.schedule import due

SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"


@dataclasses.dataclass
class FinalResult:
    """What the end of a run hands every output: the summary, the final weights and the Keras model
    holding them."""

    summary: dict
    weights: tff.learning.models.ModelWeights
    keras_model: Callable[[], Any]  # builds the compiled Keras model holding `weights`


class RunOutput:
    """One destination; every step is optional."""

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        pass

    def drop_after(self, round_num: int, warn: Callable[[str], None]) -> None:
        pass

    def finish(self, result: FinalResult) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsRelease(RunOutput):
    """Appends the record to `metrics.jsonl`."""

    def __init__(self, log: MetricsLog):
        self.log = log

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        self.log.append(record)

    def drop_after(self, round_num: int, warn: Callable[[str], None]) -> None:
        self.log.drop_after(round_num, warn)


class TensorBoardRelease(RunOutput):
    """The record's scalars every round, and the custom-scalars layout when they bring new tags; weight
    histograms every `histogram_every` rounds (0: never) and in the last."""

    def __init__(self, run_dir: Path, weight_names: list[str], histogram_every: int, last_round: int,
                 config_text: str | None):
        self.run_dir, self.weight_names = run_dir, weight_names
        self.histogram_every, self.last_round = histogram_every or None, last_round
        self.config_text = config_text
        self.known_tags: set[str] = set()
        self.board: TensorBoardLog | None = None

    def _open(self) -> TensorBoardLog:
        if self.board is None:
            self.board = TensorBoardLog(self.run_dir, self.known_tags)
            if self.config_text is not None:
                self.board.write_text("config", self.config_text)
        return self.board

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        board = self._open()
        board.write(record.round, record.scalars())
        if due(self.histogram_every, record.round, self.last_round):
            board.write_histograms(record.round, weight_arrays(self.weight_names, weights))

    def drop_after(self, round_num: int, warn: Callable[[str], None]) -> None:
        drop_events_after(self.run_dir, round_num, warn)
        self.config_text = None  # written when the run began
        self.known_tags = scalar_tags(self.run_dir)  # the layout kept covers them; new tags extend it

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class CheckpointRelease(RunOutput):
    """Saves the server state every `every` rounds and in the last round."""

    def __init__(self, checkpoints: Checkpoints, every: int, last_round: int):
        self.checkpoints, self.every, self.last_round = checkpoints, every, last_round

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        if due(self.every, record.round, self.last_round):
            self.checkpoints.save(state, record.round)


class ModelFile(RunOutput):
    """`model.keras`: the final global model, compiled (loss and accuracy), so `load_model(path)` can
    `predict` and `evaluate`. Its optimizer is Keras's default from `compile`, never used (federated
    averaging trained the weights); its variables are created before saving, so the file holds them all and
    loading it prints nothing (an unbuilt optimizer makes `load_model` warn "Skipping variable loading for
    optimizer")."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / MODEL_FILE

    def finish(self, result: FinalResult) -> None:
        keras_model = result.keras_model()
        if getattr(keras_model, "optimizer", None) is not None:
            keras_model.optimizer.build(keras_model.trainable_variables)
        replace_with(self.path, keras_model.save)


class SummaryFile(RunOutput):
    """`summary.json`."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / SUMMARY_FILE

    def finish(self, result: FinalResult) -> None:
        write_json(self.path, result.summary)


class CurvesFigure(RunOutput):
    """`curves.png`, from `metrics.jsonl`. matplotlib is slow to import: a thread imports it while the
    rounds mostly wait on the worker (a failed import is left to `finish`'s own, which reports it). It
    starts once round 1 is released, so that the first round, which a user waits for, does not share the
    interpreter with it (docs/performance.md, "Start-up")."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.importing: threading.Thread | None = None

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        if self.importing is None:
            self.importing = threading.Thread(target=self._import_plots, name="import plots", daemon=True)
            self.importing.start()

    @staticmethod
    def _import_plots() -> None:
        try:
            importlib.import_module("fedmnist.outputs.plots")
        except Exception:  # noqa: BLE001
            pass

    def finish(self, result: FinalResult) -> None:
        try:
            importlib.import_module("fedmnist.outputs.plots").write_curves(self.run_dir)
        except RunError as error:  # the report command's verdict (exit 2); here the run's own log is damaged
            raise DamagedFileError(str(error)) from None


class RunOutputs(RunOutput):
    """Every destination of a run, in order: the log first, checkpoints last, so a checkpointed round is
    always logged."""

    def __init__(self, outputs: Sequence[RunOutput]):
        self.outputs = list(outputs)

    def release(self, record: RoundRecord, state: Any, weights: tff.learning.models.ModelWeights) -> None:
        for output in self.outputs:
            output.release(record, state, weights)

    def drop_after(self, round_num: int, warn: Callable[[str], None]) -> None:
        for output in self.outputs:
            output.drop_after(round_num, warn)

    def finish(self, result: FinalResult) -> None:
        for output in self.outputs:
            output.finish(result)

    def close(self) -> None:
        for output in self.outputs:
            output.close()


def run_outputs(run_dir: Path, checkpoints: Checkpoints, weight_names: list[str], histogram_every: int,
                checkpoint_every: int, last_round: int, config_text: str) -> RunOutputs:
    """The standard outputs of a run directory."""
    return RunOutputs([
        MetricsRelease(MetricsLog(run_dir)),
        TensorBoardRelease(run_dir, weight_names, histogram_every, last_round, config_text),
        CheckpointRelease(checkpoints, checkpoint_every, last_round),
        ModelFile(run_dir),
        CurvesFigure(run_dir),
        SummaryFile(run_dir),  # last: a run with a summary has finished (a resume re-does an unfinished end)
    ])
