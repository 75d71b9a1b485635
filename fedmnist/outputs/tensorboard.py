"""TensorBoard event files of a run: per-round scalars, their layout, weight histograms, the resolved config.

Scalars (fedmnist/outputs/records.py names them): the learning curves as `<metric>/<measurement>`, e.g.
`loss/local_training`, `accuracy/evaluation_on_test_data`, `accuracy/centralized_evaluation`, first in
TensorBoard's alphabetical groups; the rest of each round under `round/...` (participation, aggregation,
learning rates, examples, seconds). Histograms `weights/...`; the config as text. A custom-scalars layout
(TensorBoard's CUSTOM SCALARS tab) draws local training and evaluation in one chart per metric, with the
`round/...` charts in collapsed sections below. By hand: `uv run tensorboard --logdir runs` (every run,
each named by its directory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import metadata as layout_metadata
from tensorboard.plugins.histogram import summary_v2 as histogram_summary

from fedmnist.outputs.metrics_log import replace_with
from fedmnist.outputs.records import MEASUREMENTS, ROUND_GROUP, flatten

LEARNING_CURVES = "learning curves: local training and evaluation"
# The `round/...` sections of the layout, in order: (the tag's part after `round/`, the section's title).
ROUND_SECTIONS = (("participation", "participation: clients per round"),
                  ("aggregation", "aggregation: what each client uploads"),
                  ("examples", "examples and batches per round"),
                  ("learning_rate", "learning rates"),
                  ("time", "time and runtime"))
_METRIC_ORDER = ("loss", "accuracy")


class TensorBoardLog:
    """A run's TensorBoard writer. Every time a round brings scalars not seen before (the first round,
    the first evaluated round), the custom-scalars layout is written again at that step, naming every
    scalar written so far; `known_tags` are those already in the run's files (a resumed run)."""

    def __init__(self, run_dir: Path, known_tags: Iterable[str] = ()):
        self.writer = tf.summary.create_file_writer(str(run_dir))
        self.tags = set(known_tags)

    def write(self, step: int, metrics: Mapping) -> None:
        values = flatten(metrics)
        with self.writer.as_default():
            for tag, value in values.items():
                tf.summary.scalar(tag, value, step=step)
            if not values.keys() <= self.tags:
                self.tags |= values.keys()
                tf.summary.write(layout_metadata.CONFIG_SUMMARY_TAG,
                                 tf.constant(layout(self.tags).SerializeToString()), step=step,
                                 metadata=layout_metadata.create_summary_metadata().SerializeToString())
        self.writer.flush()

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        """Text shown in TensorBoard's Text tab; a 4-space indent keeps its Markdown verbatim."""
        verbatim = "\n".join("    " + line for line in text.splitlines())
        with self.writer.as_default():
            tf.summary.text(tag, verbatim, step=step)
        self.writer.flush()

    def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
        """One histogram per named array, e.g. `weights/0_dense/kernel`.

        Bucketed by TensorBoard's NumPy twin of `tf.summary.histogram` (the same buckets and counts, the same
        record), not by TensorFlow ops run eagerly: about 200 of them per histogram, and the first round's
        ran each kind for the first time (0.6 s of a default run's round 1; docs/performance.md)."""
        with self.writer.as_default():
            for tag, value in arrays.items():
                summary = histogram_summary.histogram_pb(tag, np.asarray(value))
                tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def layout(tags: Iterable[str]) -> layout_pb2.Layout:
    """The custom-scalars layout of a run's scalar `tags`: first, open, one chart per metric (loss, accuracy,
    then any other) drawing every measurement of it together; below, collapsed, one chart per `round/` tag
    by section. A learning-curve chart matches its metric's group (`^loss/`), so runs with other
    measurements share it when TensorBoard merges their layouts."""
    tags = sorted(set(tags))
    metrics = sorted({tag.split("/")[0] for tag in tags if "/" in tag and not tag.startswith(ROUND_GROUP + "/")},
                     key=lambda m: (_METRIC_ORDER.index(m) if m in _METRIC_ORDER else len(_METRIC_ORDER), m))
    curves = layout_pb2.Category(title=LEARNING_CURVES, closed=False)
    for metric in metrics:
        curves.chart.add(title=f"{metric} per round",
                         multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(metric)}/"]))
    categories = [curves] if metrics else []
    by_section: dict[str, list[str]] = {}
    for tag in tags:
        if tag.startswith(ROUND_GROUP + "/"):
            by_section.setdefault(_round_section(tag), []).append(tag)
    for section, title in ROUND_SECTIONS:
        if by_section.get(section):
            category = layout_pb2.Category(title=title, closed=True)
            for tag in by_section[section]:
                category.chart.add(title=tag, multiline=layout_pb2.MultilineChartContent(tag=[f"^{re.escape(tag)}$"]))
            categories.append(category)
    return layout_pb2.Layout(category=categories)


def _round_section(tag: str) -> str:
    """`round/participation/selected` -> participation; a measurement's counts -> examples; the rest -> time."""
    part = tag.split("/")[1] if tag.count("/") > 1 else ""
    if part in ("participation", "aggregation", "learning_rate"):
        return part
    if part in {m.key for m in MEASUREMENTS}:
        return "examples"
    return "time"


def scalar_tags(run_dir: Path) -> set[str]:
    """The scalar tags in a run's event files (what a resumed run has already written)."""
    tags = set()
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        for record in read_records(path)[0]:
            for value in event_pb2.Event.FromString(record).summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    tags.add(value.tag)
    return tags


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
            replace_with(path, lambda temporary, kept=kept: write_records(temporary, kept))


def write_records(path: Path, records: Iterable[bytes]) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


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
