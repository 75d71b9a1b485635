"""Step 5 of the article: what a run reports, per round, in the console, a JSON log and TensorBoard."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorboard.compat.proto import event_pb2

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
    """Nested mappings of numpy/TF numbers as plain dicts, floats and ints (JSON-ready)."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value


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


def format_round(round_num: int, train_metrics: Mapping) -> str:
    """The article's line: `round  1, metrics={...}`."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in train_metrics.items()}
    return f"round {round_num:2d}, metrics={shown}"


def format_eval(split: str, metrics: Mapping) -> str:
    return (f"eval on {split:5s} data: loss={metrics['loss']:.4f}, "
            f"accuracy={metrics['sparse_categorical_accuracy']:.4f}")


def format_personalization(summary: Mapping) -> str:
    return (f"personalized on {summary['clients']} clients: accuracy {summary['accuracy_before']:.4f} -> "
            f"{summary['accuracy_after']:.4f}, gain mean {summary['gain_mean']:+.4f}, quartiles "
            f"{summary['gain_q1']:+.4f} / {summary['gain_median']:+.4f} / {summary['gain_q3']:+.4f}")


def is_finite_loss(train_metrics: Mapping) -> bool:
    return math.isfinite(float(train_metrics.get("loss", 0.0)))


class MetricsLog:
    """`metrics.jsonl`: one JSON object per round, appended and flushed as each round ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, row: Mapping) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(row, allow_nan=True) + "\n")

    def drop_after(self, round_num: int) -> None:
        """Keeps only rows up to `round_num` (rounds after the checkpoint a run resumes from)."""
        kept = [row for row in self.rows() if row["round"] <= round_num]
        if len(kept) != len(self.rows()):
            _replace_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class TensorBoardLog:
    """Scalars per round under `train/...`, `eval/train/...`, `eval/test/...`, `time/...`,
    `learning_rate/...`; histograms `weights/...`; the resolved config as text."""

    def __init__(self, run_dir: Path):
        self.writer = tf.summary.create_file_writer(str(run_dir))

    def write(self, step: int, metrics: Mapping) -> None:
        with self.writer.as_default():
            for tag, value in flatten(metrics).items():
                tf.summary.scalar(tag, value, step=step)
        self.writer.flush()

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        """Text shown in TensorBoard's Text tab; a 4-space indent keeps its Markdown verbatim."""
        verbatim = "\n".join("    " + line for line in text.splitlines())
        with self.writer.as_default():
            tf.summary.text(tag, verbatim, step=step)
        self.writer.flush()

    def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
        """One histogram per named array, e.g. `weights/dense/kernel`."""
        with self.writer.as_default():
            for tag, value in arrays.items():
                tf.summary.histogram(tag, np.asarray(value), step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def drop_events_after(run_dir: Path, round_num: int) -> None:
    """Removes TensorBoard events of steps after `round_num` from the run's event files."""
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= round_num]
        if len(kept) != len(records):
            temporary = path.with_name(path.name + ".tmp")
            with tf.io.TFRecordWriter(str(temporary)) as writer:
                for record in kept:
                    writer.write(record)
            os.replace(temporary, path)


def _replace_atomically(path: Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
