"""TensorBoard event files of a run: per-round scalars, weight histograms, the resolved config.

Scalars under `train/...`, `eval/train/...`, `eval/test/...`, `participation/...`, `aggregation/...`,
`time/...`, `learning_rate/...`; histograms `weights/...`; the config as text. By hand:
`uv run tensorboard --logdir runs` (all runs) or `--logdir runs/<run>`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorboard.compat.proto import event_pb2

from fedmnist.outputs.records import flatten


class TensorBoardLog:
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
        """One histogram per named array, e.g. `weights/0_dense/kernel`."""
        with self.writer.as_default():
            for tag, value in arrays.items():
                tf.summary.histogram(tag, np.asarray(value), step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def drop_events_after(run_dir: Path, round_num: int, warn: Callable[[str], None] = lambda line: None) -> None:
    """Removes TensorBoard events of steps after `round_num` from the run's event files, and a last record
    cut short (a crash or a full disk during a flush): `warn` says so. Each file is rewritten beside itself
    and renamed over it once whole."""
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        records, torn = read_records(path)
        kept = [r for r in records if event_pb2.Event.FromString(r).step <= round_num]
        if torn:
            warn(f"warning: {path.name}: its last record was cut short, as by a crash while writing it; dropped")
        if len(kept) != len(records) or torn:
            temporary = path.with_name(f".{path.name}.tmp")
            try:
                with tf.io.TFRecordWriter(str(temporary)) as writer:
                    for record in kept:
                        writer.write(record)
                os.replace(temporary, path)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise


def read_records(path: Path) -> tuple[list[bytes], bool]:
    """The whole records of a TFRecord file, and whether it ends in a cut one."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            records.append(record)
    except tf.errors.DataLossError:
        return records, True
    return records, False


def weight_names(keras_model: tf.keras.Model) -> list[str]:
    """Stable names for the model's trainable weights, in `ModelWeights.trainable` order:
    `<layer index>_<layer type>/<weight>`, e.g. `0_dense/kernel` (Keras' own layer names carry a
    per-process counter, `dense_7`, so they differ from run to run)."""
    names = []
    for index, layer in enumerate(keras_model.layers):
        kind = layer.__class__.__name__.lower()
        for weight in layer.trainable_weights:
            short = weight.name.split("/")[-1].split(":")[0]
            names.append(f"{index}_{kind}/{short}")
    return names


def weight_arrays(names: list[str], weights: tff.learning.models.ModelWeights) -> dict[str, np.ndarray]:
    return {f"weights/{name}": np.asarray(value) for name, value in zip(names, weights.trainable)}
