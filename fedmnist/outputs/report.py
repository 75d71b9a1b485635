"""Compare finished (or running) runs: `python -m fedmnist.report RUN_DIR [RUN_DIR ...]`.

Prints a table of each run's final metrics, then the rounds each run took to reach the target test
accuracies (`accuracy_targets`, default 0.97 and 0.99, or `--target`; McMahan et al.'s Table 2, see
fedmnist/outputs/targets.py), and writes one PNG overlaying the runs' accuracy curves with the targets
as horizontal lines (default `runs/report-<timestamp>.png`; an existing file is replaced only with
`--overwrite`).
Exit codes: 0 done, 2 a bad run directory or bad usage. It reads only the run directories'
files, so it starts quickly (no TensorFlow).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from fedmnist.cli import ArgumentParser, UsageError
from fedmnist.outputs import targets as targets_lib
from fedmnist.outputs.plots import RunError, plot_accuracy_overlay, read_records, series
from fedmnist.outputs.records import ACCURACY, RoundRecord, accuracy_key

RUNS_ROOT = Path("runs")
FORMATS = (".png", ".svg", ".pdf")
COLUMNS = ("run", "dataset", "model", "rounds", "train loss", "train acc", "eval train acc",
           "eval test acc", "seconds")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedmnist.report",
                     description="Final metrics of fedmnist runs as a table, and their accuracy curves in one PNG.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run directory")
    parser.add_argument("--output", type=Path,
                        help="where to write the plot (.png, .svg or .pdf; default runs/report-<timestamp>.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--target", type=float, action="append", metavar="ACCURACY",
                        help="a target test accuracy for rounds-to-target (repeatable; default: each run's "
                             "accuracy_targets, 0.97 and 0.99 unless configured)")
    return parser


def _read_optional(path: Path, loader) -> dict:
    try:
        value = loader(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        raise RunError(f"{path.parent}: {path.name} cannot be read: {error}") from None
    return value if isinstance(value, dict) else {}


def final_metrics(records: Sequence[RoundRecord]) -> dict:
    """The last round's training metrics and the latest evaluation of each kind (federated on train and
    test data, centralized), which a run may log at different rounds."""
    latest: dict = {}
    for record in records:
        if isinstance(record.eval, Mapping):
            latest.update(record.eval)
    return {"rounds": len(records), "train": records[-1].train or {}, "eval": latest}


def run_facts(run_dir: Path, targets: Sequence[float] | None = None) -> dict:
    """Everything the tables show for one run; raises RunError when it is not a run. Rounds to target
    are for `targets`, else the run's `accuracy_targets`, else 0.97 and 0.99."""
    records = read_records(run_dir)
    summary = _read_optional(run_dir / "summary.json", json.loads)
    config = _read_optional(run_dir / "config.yaml", yaml.safe_load)
    facts = final_metrics(records)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    facts["dataset"] = summary.get("dataset") or data.get("dataset", "?")
    facts["model"] = summary.get("model") or config.get("model", "?")
    facts["planned_rounds"] = config.get("rounds")
    facts["finished"] = bool(summary)
    facts["seconds"] = summary.get("total_seconds") or sum(record.seconds or 0.0 for record in records)
    facts["records"] = records
    configured = config.get("accuracy_targets")
    wanted = targets or (configured if isinstance(configured, list) else targets_lib.DEFAULT_TARGETS)
    facts["targets"] = targets_lib.summarize(records, [float(t) for t in wanted])
    return facts


def _number(metrics: Mapping, name: str) -> str:
    if name == ACCURACY:
        name = accuracy_key(metrics)
    value = metrics.get(name)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def table_row(label: str, facts: Mapping) -> list[str]:
    rounds = str(facts["rounds"])
    if not facts["finished"]:
        rounds += f"/{facts['planned_rounds']}" if facts["planned_rounds"] else " (unfinished)"
    evaluation = facts["eval"]
    return [label, str(facts["dataset"]), str(facts["model"]), rounds,
            _number(facts["train"], "loss"), _number(facts["train"], ACCURACY),
            _number(evaluation.get("train", {}), ACCURACY), _number(evaluation.get("test", {}), ACCURACY),
            f"{facts['seconds']:.1f}"]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *map(line, rows)])


def format_targets_table(facts: Mapping[str, Mapping]) -> str:
    """One row per run that logged test accuracy: which evaluation, its best, the rounds to each target."""
    measured = {label: f["targets"] for label, f in facts.items() if f["targets"]["evaluation"]}
    wanted = sorted({target for reached in measured.values() for target in reached["targets"]}, key=float)
    header = ["run", "evaluation", "best", *[f"rounds to {target}" for target in wanted]]
    rows = [[label, reached["evaluation"], f"{reached['best_accuracy']:.4f}",
             *[targets_lib.describe(reached["targets"][t], reached["rounds"]) if t in reached["targets"] else "-"
               for t in wanted]]
            for label, reached in measured.items()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(header), line(["-" * w for w in widths]), *map(line, rows)]
    note = ("rounds to reach each target test accuracy (the best accuracy so far, interpolated between "
            "rounds, as McMahan et al. 2017 count them):")
    return "\n".join([note, *lines])


def add_targets(figure, runs: Mapping[str, Mapping]) -> None:
    """On the overlay's test-accuracy axes: each run's centralized evaluation (dashed, the run's colour)
    and the targets as horizontal grey lines, as in McMahan et al.'s Figure 2."""
    test_axes = figure.axes[1]
    centralized = False
    for index, (label, facts) in enumerate(runs.items()):
        rounds, values = series(facts["records"], ("eval", "centralized"), ACCURACY)
        if rounds:
            centralized = True
            test_axes.plot(rounds, values, "--", color=f"C{index % 10}", label=f"{label} (centralized)")
    wanted = {float(target) for facts in runs.values() if facts["targets"]["evaluation"]
              for target in facts["targets"]["targets"]}
    for target in sorted(wanted):
        test_axes.axhline(target, color="0.5", linewidth=0.8, zorder=0)
    if centralized:
        test_axes.set_title("test accuracy: federated (solid), centralized (dashed)")


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, or the paths as given where two runs share a name."""
    names = [path.resolve().name for path in run_dirs]
    return [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_dirs)]


def output_path(requested: Path | None, overwrite: bool) -> Path:
    if requested is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        RUNS_ROOT.mkdir(exist_ok=True)
        for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
            candidate = RUNS_ROOT / f"report-{stamp}{suffix}.png"
            if not candidate.exists():
                return candidate
        raise UsageError("too many reports this second; pass --output")
    if requested.suffix.lower() not in FORMATS:
        raise UsageError(f"--output {requested}: use a .png, .svg or .pdf file name")
    if requested.is_dir():
        raise UsageError(f"--output {requested} is a directory; give a file name")
    if requested.exists() and not overwrite:
        raise UsageError(f"--output {requested} already exists; pass --overwrite to replace it")
    if not requested.parent.is_dir():
        raise UsageError(f"--output {requested}: directory {requested.parent} does not exist")
    return requested


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        bad = [target for target in args.target or [] if not 0 < target <= 1]
        if bad:
            raise UsageError(f"--target {bad[0]:g}: a target is a test accuracy in (0, 1]")
        labels = run_labels(args.run_dirs)
        facts = {label: run_facts(path, args.target) for label, path in zip(labels, args.run_dirs)}
        output = output_path(args.output, args.overwrite)
        print(format_table([table_row(label, f) for label, f in facts.items()]))
        if any(f["targets"]["evaluation"] and f["targets"]["targets"] for f in facts.values()):
            print()
            print(format_targets_table(facts))
        figure = plot_accuracy_overlay({label: f["records"] for label, f in facts.items()})
        add_targets(figure, facts)
        figure.savefig(output)
        print(f"accuracy curves: {output}")
        return 0
    except (UsageError, RunError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write the plot: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
