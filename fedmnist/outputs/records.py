"""What a round produces: one typed record, written to `metrics.jsonl` and read back by plots and reports.

Kept free of TensorFlow, so reports and plots start fast.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any



METRICS_FILE = "metrics.jsonl"
ACCURACY = "sparse_categorical_accuracy"


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

    def scalars(self) -> dict:
        """The numbers TensorBoard shows for the round, nested by section."""
        sections = {name: getattr(self, name)
                    for name in ("train", "eval", "participation", "aggregation", "learning_rate")}
        scalars = {name: value for name, value in sections.items() if value}
        if self.events:
            scalars["runtime"] = {"worker_restarts": sum(e.get("event") == "worker_restarted" for e in self.events)}
        return scalars | ({} if self.seconds is None else {"time": {"round_seconds": self.seconds}})


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
