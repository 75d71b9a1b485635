"""Learning curves from a run's `metrics.jsonl`: `curves.png` in every run directory.

Figures are built with `matplotlib.figure.Figure` and saved through the Agg canvas, so plotting
never touches pyplot's global state or needs a display, and works the same in scripts, tests and
notebooks (where a returned Figure shows itself inline).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from fedmnist.errors import DamagedFileError, RunError
from fedmnist.outputs.metrics_log import MetricsLog, replace_atomically
from fedmnist.outputs.records import (ACCURACY, CENTRALIZED_EVALUATION, EVALUATION_ON_TEST_DATA,
                                      EVALUATION_ON_TRAINING_DATA, LOCAL_TRAINING, METRICS_FILE, RoundRecord,
                                      accuracy_key)

CURVES_FILE = "curves.png"
# (what is measured, line style); the legend says its name
_SERIES = ((LOCAL_TRAINING, "-"), (EVALUATION_ON_TRAINING_DATA, "--"), (EVALUATION_ON_TEST_DATA, ":"),
           (CENTRALIZED_EVALUATION, "-."))


def read_records(run_dir: str | Path) -> list[RoundRecord]:
    """The rounds of a run's `metrics.jsonl` (`MetricsLog`'s reading: a last line a running or crashed run
    cut short is left out), or a `RunError` saying in one line why there are none to plot."""
    if not Path(run_dir).is_dir():
        raise RunError(f"{run_dir}: " + ("not a directory" if Path(run_dir).exists() else "no such run directory"))
    log = MetricsLog(Path(run_dir))
    if not log.path.is_file():
        raise RunError(f"{run_dir}: not a fedmnist run ({METRICS_FILE} is missing)")
    try:
        records = log.records()
    except OSError as error:
        raise RunError(f"{run_dir}: {METRICS_FILE} cannot be read: {error.strerror or error}") from None
    except DamagedFileError as error:
        raise RunError(f"{run_dir}: {error}") from None
    if not records:
        raise RunError(f"{run_dir}: {METRICS_FILE} holds no rounds yet")
    return records


def series(records: Sequence[RoundRecord], path: Sequence[str], metric: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of one metric, e.g. `series(records, ("eval", "test"), "loss")`; rounds
    without that metric (no evaluation that round) are skipped."""
    rounds, values = [], []
    for record in records:
        metrics = record.metrics(path)
        if metrics is None:
            continue
        name = accuracy_key(metrics) if metric == ACCURACY else metric
        if name in metrics:
            rounds.append(record.round)
            values.append(float(metrics[name]))
    return rounds, values


def plot_curves(records: Sequence[RoundRecord], title: str = "") -> Figure:
    """Loss and accuracy per round: local training, federated evaluation on training and test data, and
    centralized evaluation when the run has it, side by side."""
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, metric, label in ((loss_axes, "loss", "loss"), (accuracy_axes, ACCURACY, "accuracy")):
        for measured, style in _SERIES:
            rounds, values = series(records, measured.path, metric)
            if rounds:
                axes.plot(rounds, values, style, marker="o", markersize=4, label=measured.name)
        axes.set_xlabel("round")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.xaxis.get_major_locator().set_params(integer=True)
    accuracy_axes.set_ylim(0.0, 1.0)
    accuracy_axes.legend(loc="lower right", fontsize="small")
    if title:
        figure.suptitle(title)
    return figure


def write_curves(run_dir: str | Path, title: str | None = None) -> Path:
    """Writes `curves.png` from the run's `metrics.jsonl` and returns its path."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    path = run_dir / CURVES_FILE
    replace_atomically(path, png_bytes(plot_curves(records, run_dir.resolve().name if title is None else title)))
    return path


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, for `replace_atomically` (an interrupted save leaves no cut figure)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_accuracy_overlay(runs: Mapping[str, Sequence[RoundRecord]]) -> Figure:
    """The accuracy curves of several runs in one figure: local training on the left, evaluation on test
    data on the right, one colour per run."""
    figure = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    train_axes, test_axes = figure.subplots(1, 2, sharey=True)
    for index, (name, records) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        for axes, path in ((train_axes, LOCAL_TRAINING.path), (test_axes, EVALUATION_ON_TEST_DATA.path)):
            rounds, values = series(records, path, ACCURACY)
            if rounds:
                axes.plot(rounds, values, "-", marker="o", markersize=4, color=colour, label=name)
    train_axes.set_title(f"accuracy in {LOCAL_TRAINING.name}")
    test_axes.set_title(f"accuracy in {EVALUATION_ON_TEST_DATA.name}")
    for axes in (train_axes, test_axes):
        axes.set_xlabel("round")
        axes.grid(alpha=0.3)
        axes.set_ylim(0.0, 1.0)
        axes.xaxis.get_major_locator().set_params(integer=True)
    train_axes.set_ylabel("accuracy")
    train_axes.legend(loc="lower right", fontsize="small")
    return figure
