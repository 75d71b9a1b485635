"""What a round produces: one typed record, written to `metrics.jsonl` and read back by plots and reports.

Kept free of TensorFlow, so reports and plots start fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any



METRICS_FILE = "metrics.jsonl"
ACCURACY = "sparse_categorical_accuracy"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One thing a run measures, named once for everywhere a person reads it: the console, summary.json,
    `fedmnist report`, TensorBoard, curves.png and the notebooks. `path` is where its metrics live in a
    `RoundRecord` (metrics.jsonl keeps its keys, `train` and `eval`, so older runs still resume and
    report); `name` is what a person reads; `key` is its summary.json key and TensorBoard tag part."""

    path: tuple[str, ...]
    name: str
    key: str


LOCAL_TRAINING = Measurement(("train",), "local training", "local_training")
EVALUATION_ON_TRAINING_DATA = Measurement(("eval", "train"), "evaluation on training data",
                                          "evaluation_on_training_data")
EVALUATION_ON_TEST_DATA = Measurement(("eval", "test"), "evaluation on test data", "evaluation_on_test_data")
CENTRALIZED_EVALUATION = Measurement(("eval", "centralized"), "centralized evaluation", "centralized_evaluation")
# Local training: the metrics TFF's `client_work/train` reports, computed by the clients while they train
# in a round (the model changes as they go). Evaluation on training / test data: federated evaluation
# (`build_fed_eval`, or the same on prepared tensors) of the global model on the evaluation clients'
# training / test data. Centralized evaluation: the server evaluates the global model on the pooled test set.
MEASUREMENTS = (LOCAL_TRAINING, EVALUATION_ON_TRAINING_DATA, EVALUATION_ON_TEST_DATA, CENTRALIZED_EVALUATION)
# TensorBoard: learning curves are `<metric>/<measurement key>` (`loss/local_training`,
# `accuracy/evaluation_on_test_data`), so they come first in TensorBoard's alphabetical groups; everything
# else about a round (participation, aggregation, learning rates, examples, seconds) is under `round/`.
ROUND_GROUP = "round"
COUNTS = ("num_examples", "num_batches")


def measurement(split: str) -> Measurement:
    """The measurement of an `eval` entry: "train", "test" or "centralized"."""
    return next(m for m in MEASUREMENTS if m.path == ("eval", split))


@dataclasses.dataclass
class RoundRecord:
    """One round of a run, as one line of `metrics.jsonl`.

    `train` is the clients' local training metrics (absent when the round was skipped); `eval` maps
    `train`/`test` to the federated evaluation's metrics in rounds that evaluate, and `centralized` to the
    server's evaluation on the pooled test set in rounds that run it; `aggregation` is what
    the aggregation mode reports (bytes, epsilon, dropouts); `learning_rate` the client and server
    learning rates in the state after the round; `events` lists what happened to the runtime during
    the round (a worker restarted).
    """

    round: int
    clients: list[str] = dataclasses.field(default_factory=list)
    participation: dict = dataclasses.field(default_factory=dict)
    train: dict | None = None
    aggregation: dict | None = None
    eval: dict[str, dict] | None = None
    learning_rate: dict | None = None
    seconds: float | None = None  # None: not released (it would tell a secret sample's size)
    events: list[dict] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        """The JSON object of `metrics.jsonl`: empty parts are left out."""
        return {field.name: value for field in dataclasses.fields(self)
                if (value := getattr(self, field.name)) is not None and value != []}

    @classmethod
    def from_json(cls, row: Mapping) -> RoundRecord:
        """A record from a `metrics.jsonl` object; unknown keys (from newer versions) are ignored."""
        if not isinstance(row, Mapping) or not isinstance(row.get("round"), int):
            raise ValueError("no round number")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in row.items() if key in names})

    def metrics(self, path: Sequence[str]) -> Mapping | None:
        """The metrics at `path`, e.g. `("eval", "test")` or `("train",)`; None when absent."""
        value: Any = self.to_json()
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value if isinstance(value, Mapping) else None

    def scalars(self) -> dict[str, float]:
        """The numbers TensorBoard shows for the round, by tag: learning curves as `<metric>/<measurement>`
        (`accuracy` for the accuracy, whatever the model calls it), the rest under `round/`."""
        tags: dict[str, float] = {}
        for measured in MEASUREMENTS:
            metrics = self.metrics(measured.path) or {}
            for name, value in flatten(metrics).items():
                if name in COUNTS:
                    tags[f"{ROUND_GROUP}/{measured.key}/{name}"] = value
                else:
                    tags[f"{'accuracy' if name == accuracy_key(metrics) else name}/{measured.key}"] = value
        for section in ("participation", "aggregation", "learning_rate"):
            tags |= flatten(getattr(self, section) or {}, f"{ROUND_GROUP}/{section}/")
        if self.events:
            tags[f"{ROUND_GROUP}/worker_restarts"] = sum(e.get("event") == "worker_restarted" for e in self.events)
        if self.seconds is not None:
            tags[f"{ROUND_GROUP}/seconds"] = self.seconds
        return tags


def accuracy_key(metrics: Mapping) -> str:
    """The accuracy metric's name: Keras models report `sparse_categorical_accuracy`, the
    tutorial's hand-written model `accuracy`."""
    return ACCURACY if ACCURACY in metrics else "accuracy"


def flatten(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """`{'eval': {'test': {'loss': 1.0}}}` -> `{'eval/test/loss': 1.0}`, numbers only."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat
