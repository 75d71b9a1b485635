"""Compare finished (or running) runs: `python -m fedmnist.report RUN_DIR [RUN_DIR ...]`.

Prints a table of each run's final metrics and writes one PNG overlaying the runs' accuracy curves
(default `runs/report-<timestamp>.png`; an existing file is replaced only with `--overwrite`).
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
from fedmnist.outputs.plots import RunError, plot_accuracy_overlay, read_records
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
    """The last round's training metrics and the latest federated evaluation."""
    evaluated = [record.eval for record in records if isinstance(record.eval, Mapping)]
    return {"rounds": len(records), "train": records[-1].train or {},
            "eval": evaluated[-1] if evaluated else {}}


def run_facts(run_dir: Path) -> dict:
    """Everything the table shows for one run; raises RunError when it is not a run."""
    records = read_records(run_dir)
    summary = _read_optional(run_dir / "summary.json", json.loads)
    config = _read_optional(run_dir / "config.yaml", yaml.safe_load)
    facts = final_metrics(records)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    facts["dataset"] = summary.get("dataset") or data.get("dataset", "?")
    facts["model"] = summary.get("model") or config.get("model", "?")
    facts["planned_rounds"] = config.get("rounds")
    facts["finished"] = bool(summary)
    facts["seconds"] = summary.get("total_seconds") or sum(record.seconds for record in records)
    facts["records"] = records
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
        labels = run_labels(args.run_dirs)
        facts = {label: run_facts(path) for label, path in zip(labels, args.run_dirs)}
        output = output_path(args.output, args.overwrite)
        print(format_table([table_row(label, f) for label, f in facts.items()]))
        plot_accuracy_overlay({label: f["records"] for label, f in facts.items()}).savefig(output)
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
