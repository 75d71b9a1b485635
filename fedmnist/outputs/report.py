"""Compare finished (or running) runs: `python -m fedmnist.report RUN_DIR [RUN_DIR ...]`.

Prints a table of each run's final metrics (local training; evaluation on training data, on test data;
centralized evaluation when a run has it), the settings that differ between the runs (from their
config.yaml), then, when targets are set (`accuracy_targets` in a run's config, or `--target`), the rounds
each run took to reach them (McMahan et al.'s Table 2, see fedmnist/outputs/targets.py), and writes one
PNG overlaying the runs' accuracy curves with the targets as horizontal lines (default
`runs/report-<timestamp>.png`; an existing file is replaced only with `--overwrite`).

A directory that is not a run (no metrics.jsonl, no rounds yet, unreadable) is skipped with one line on
stderr, so `fedmnist report runs/*/` reports every run among them. Exit codes: 0 done (at least one run
reported), 2 no run to report or bad usage, 1 the plot cannot be written. It reads only the run
directories' files, so it starts quickly (no TensorFlow); summaries written by older versions (keys
`train` and `eval`) read the same.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from fedmnist.cli import ArgumentParser
from fedmnist.errors import RunError, UsageError
from fedmnist.outputs import targets as targets_lib
from fedmnist.outputs.plots import plot_accuracy_overlay, read_records, series
from fedmnist.outputs.records import (ACCURACY, CENTRALIZED_EVALUATION, EVALUATION_ON_TEST_DATA,
                                      EVALUATION_ON_TRAINING_DATA, LOCAL_TRAINING, RoundRecord, accuracy_key,
                                      measurement)

RUNS_ROOT = Path("runs")
FORMATS = (".png", ".svg", ".pdf")
CONFIG_FILE = "config.yaml"
# The final-metrics table: (the column's group, its name). A group spans the columns that share it.
COLUMNS = (("", "run"), ("", "dataset"), ("", "model"), ("", "rounds"),
           (LOCAL_TRAINING.name, "loss"), (LOCAL_TRAINING.name, "accuracy"),
           (EVALUATION_ON_TRAINING_DATA.name, "accuracy"), (EVALUATION_ON_TEST_DATA.name, "accuracy"),
           (CENTRALIZED_EVALUATION.name, "accuracy"), ("", "seconds"))
_CENTRALIZED_COLUMN = 8


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedmnist.report",
                            description="Final metrics of fedmnist runs as a table, the settings that differ "
                                        "between them, and their accuracy curves in one PNG.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="a run directory; directories that are not runs are skipped with a note")
    parser.add_argument("--output", type=Path,
                        help="where to write the plot (.png, .svg or .pdf; default runs/report-<timestamp>.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--target", type=float, action="append", metavar="ACCURACY",
                        help="a target test accuracy for rounds-to-target (repeatable; default: the runs' "
                             "accuracy_targets, none unless a config sets them)")
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
    """The last round's local training metrics and the latest evaluation of each kind (on training data, on
    test data, centralized), which a run may log at different rounds."""
    latest: dict = {}
    for record in records:
        if isinstance(record.eval, Mapping):
            latest.update(record.eval)
    return {"rounds": len(records), "train": records[-1].train or {}, "eval": latest}


def run_seconds(summary: Mapping, records: Sequence[RoundRecord]) -> float | None:
    """The run's time: summary.json's total, else the rounds' own when every round has one; None when unknown
    (a notebook's rounds without times, or a secret sample's, whose times are not released)."""
    total = summary.get("total_seconds")
    if isinstance(total, (int, float)) and not isinstance(total, bool) and total > 0:
        return float(total)
    seconds = [record.seconds for record in records]
    if seconds and all(isinstance(s, (int, float)) and s > 0 for s in seconds):
        return float(sum(seconds))
    return None


def run_facts(run_dir: Path, targets: Sequence[float] | None = None) -> dict:
    """Everything the tables show for one run; raises RunError when it is not a run. Rounds to target are for
    `targets`, else the run's `accuracy_targets` (none when its config sets none)."""
    records = read_records(run_dir)
    summary = _read_optional(run_dir / "summary.json", json.loads)
    config = _read_optional(run_dir / CONFIG_FILE, yaml.safe_load)
    facts = final_metrics(records)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    facts["dataset"] = summary.get("dataset") or data.get("dataset", "?")
    facts["model"] = summary.get("model") or config.get("model", "?")
    facts["planned_rounds"] = config.get("rounds")
    facts["finished"] = bool(summary)
    facts["seconds"] = run_seconds(summary, records)
    facts["records"] = records
    facts["config"] = config
    configured = config.get("accuracy_targets")
    facts["configured_targets"] = [float(t) for t in configured] if isinstance(configured, list) else []
    wanted = facts["configured_targets"] if targets is None else targets
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
    seconds = facts["seconds"]
    return [label, str(facts["dataset"]), str(facts["model"]), rounds,
            _number(facts["train"], "loss"), _number(facts["train"], ACCURACY),
            _number(evaluation.get("train", {}), ACCURACY), _number(evaluation.get("test", {}), ACCURACY),
            _number(evaluation.get("centralized", {}), ACCURACY),
            "-" if seconds is None else f"{seconds:.1f}"]


def format_table(rows: Sequence[Sequence[str]], columns: Sequence[tuple[str, str]] = COLUMNS,
                 left: int = 3) -> str:
    """A table whose header has two lines: each group's name over the columns it spans, then the columns'
    names. The first `left` columns are left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [[name for _, name in columns], *rows]) for i in range(len(columns))]
    spans: list[tuple[str, list[int]]] = []
    for index, (group, _) in enumerate(columns):
        if spans and group and spans[-1][0] == group:
            spans[-1][1].append(index)
        else:
            spans.append((group, [index]))
    for group, indexes in spans:  # a group's name wider than its columns widens the last of them
        spanned = sum(widths[i] for i in indexes) + 2 * (len(indexes) - 1)
        widths[indexes[-1]] += max(0, len(group) - spanned)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    groups = "  ".join(group.ljust(sum(widths[i] for i in indexes) + 2 * (len(indexes) - 1))
                       for group, indexes in spans).rstrip()
    lines = [line([name for _, name in columns]), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join(([groups] if groups else []) + lines)


def metrics_table(facts: Mapping[str, Mapping]) -> str:
    """The final-metrics table; the centralized-evaluation column only when a run has it."""
    rows = [table_row(label, f) for label, f in facts.items()]
    keep = [i for i in range(len(COLUMNS))
            if i != _CENTRALIZED_COLUMN or any(row[i] != "-" for row in rows)]
    return format_table([[row[i] for i in keep] for row in rows], [COLUMNS[i] for i in keep])


# --- Settings that differ -------------------------------------------------------------------------

def flat_settings(config: Mapping, prefix: str = "") -> dict[str, object]:
    """`{'client_optimizer': {'learning_rate': 0.1}}` -> `{'client_optimizer.learning_rate': 0.1}`."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat |= flat_settings(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _setting_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_setting_text(v) for v in value) + "]"
    return str(value)


def differing_settings(configs: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
    """The dotted settings whose values are not the same in every run's config, as text per run ("-" where
    a run's config does not have the key, e.g. a run made by an older version)."""
    flat = {label: flat_settings(config) for label, config in configs.items()}
    keys = sorted({key for settings in flat.values() for key in settings})
    missing = object()
    return {key: {label: "-" if settings.get(key, missing) is missing else _setting_text(settings[key])
                  for label, settings in flat.items()}
            for key in keys
            if len({json.dumps(settings.get(key, "\0missing"), sort_keys=True, default=str)
                    for settings in flat.values()}) > 1}


def format_settings(facts: Mapping[str, Mapping]) -> str:
    """What differs between the runs' config.yaml files, one setting per line, one column per run; runs
    without a config.yaml (a notebook's) are named, not compared."""
    configs = {label: f["config"] for label, f in facts.items() if f["config"]}
    without = [label for label, f in facts.items() if not f["config"]]
    lines = []
    if len(configs) >= 2:
        differ = differing_settings(configs)
        if differ:
            rows = [[key, *values.values()] for key, values in differ.items()]
            columns = [("", "setting"), *[("", label) for label in configs]]
            lines += [f"settings that differ ({CONFIG_FILE}):", format_table(rows, columns, left=len(columns))]
        else:
            lines.append(f"settings: the same in every run's {CONFIG_FILE}")
    if without:
        lines.append(f"no {CONFIG_FILE} (settings not compared): {', '.join(without)}")
    return "\n".join(lines)


# --- Rounds to target ---------------------------------------------------------------------------

def format_targets_table(facts: Mapping[str, Mapping]) -> str:
    """One row per run that logged test accuracy: which evaluation, its best, the rounds to each target."""
    measured = {label: f["targets"] for label, f in facts.items() if f["targets"]["evaluation"]}
    wanted = sorted({target for reached in measured.values() for target in reached["targets"]}, key=float)
    header = ["run", "evaluation", "best", *[f"rounds to {target}" for target in wanted]]
    rows = [[label, measurement(reached["evaluation"]).name, f"{reached['best_accuracy']:.4f}",
             *[targets_lib.describe(reached["targets"][t], reached["rounds"]) if t in reached["targets"] else "-"
               for t in wanted]]
            for label, reached in measured.items()]
    note = ("rounds to reach each target test accuracy (the best accuracy so far, interpolated between "
            "rounds, as McMahan et al. 2017 count them):")
    return "\n".join([note, format_table(rows, [("", name) for name in header], left=2)])


def add_targets(figure, runs: Mapping[str, Mapping]) -> None:
    """On the overlay's test-accuracy axes: each run's centralized evaluation (dashed, the run's colour)
    and the targets as horizontal grey lines, as in McMahan et al.'s Figure 2."""
    test_axes = figure.axes[1]
    centralized = False
    for index, (label, facts) in enumerate(runs.items()):
        rounds, values = series(facts["records"], CENTRALIZED_EVALUATION.path, ACCURACY)
        if rounds:
            centralized = True
            test_axes.plot(rounds, values, "--", color=f"C{index % 10}",
                           label=f"{label} ({CENTRALIZED_EVALUATION.name})")
    wanted = {float(target) for facts in runs.values() if facts["targets"]["evaluation"]
              for target in facts["targets"]["targets"]}
    for target in sorted(wanted):
        test_axes.axhline(target, color="0.5", linewidth=0.8, zorder=0)
    if centralized:
        test_axes.set_title(f"accuracy: {EVALUATION_ON_TEST_DATA.name} (solid), "
                            f"{CENTRALIZED_EVALUATION.name} (dashed)")


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


def read_runs(run_dirs: Sequence[Path], targets: Sequence[float] | None) -> dict[str, dict]:
    """The facts of every directory that is a run, by label; each other one is skipped with one line on
    stderr. A single directory that is not a run, or none among several, is an error (RunError)."""
    facts, skipped = {}, []
    for label, path in zip(run_labels(run_dirs), run_dirs):
        try:
            facts[label] = run_facts(path, targets)
        except RunError as error:
            skipped.append(error)
    if not facts:
        if len(skipped) == 1:
            raise skipped[0]
        raise RunError(f"none of the {len(skipped)} directories is a fedmnist run with rounds")
    for error in skipped:
        print(f"skipped {error}", file=sys.stderr)
    if targets is None:  # compare every run against every run's targets
        wanted = sorted({t for f in facts.values() for t in f["configured_targets"]})
        for f in facts.values():
            f["targets"] = targets_lib.summarize(f["records"], wanted)
    return facts


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        bad = [target for target in args.target or [] if not 0 < target <= 1]
        if bad:
            raise UsageError(f"--target {bad[0]:g}: a target is a test accuracy in (0, 1]")
        output = args.output if args.output is None else output_path(args.output, args.overwrite)
        facts = read_runs(args.run_dirs, args.target)
        output = output or output_path(None, args.overwrite)
        print(metrics_table(facts))
        if settings := format_settings(facts):
            print()
            print(settings)
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
        return error.exit_code
    except OSError as error:
        print(f"error: cannot write the plot: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
