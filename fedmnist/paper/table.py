"""A paper's table from the run directories `fedmnist reproduce` made: `table.md` and `curves.png`.

Each run is read as `fedmnist report` reads it (`fedmnist.outputs.report.run_facts`): rounds to the row's
target as the paper counts them (fedmnist/outputs/targets.py), its best test accuracy, its rounds and times.
A row's best learning rate is the one with the fewest rounds to target, averaged over the seeds that every
rate whose runs all reached the target has run; a learning rate whose runs did not all reach the target
ranks after every one whose runs did (among those, by best accuracy); an exact tie goes to the smaller rate.
Kept free of TensorFlow, so `--table-only` starts fast.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from fedmnist.errors import RunError
from fedmnist.outputs import targets as targets_lib
from fedmnist.outputs.metrics_log import replace_atomically
from fedmnist.outputs.plots import png_bytes, series
from fedmnist.outputs.records import ACCURACY, CENTRALIZED_EVALUATION, METRICS_FILE
from fedmnist.outputs.report import CONFIG_FILE, run_facts
from fedmnist.paper.mcmahan2017 import PAPER, Row

TABLE_FILE = "table.md"
SUMMARY_FILE = "summary.json"  # fedmnist.outputs.sink.SUMMARY_FILE, whose module starts TensorFlow
RECORD_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE)  # what a run's row is read from
CURVES_FILE = "curves.png"
RUN_NAME = re.compile(r"^(?P<row>.+)-lr(?P<lr>[0-9.eE+-]+)-seed(?P<seed>[0-9]+)$")


@dataclasses.dataclass
class Result:
    """One run of the grid, as the table shows it."""

    row: str
    lr: float
    seed: int
    path: Path
    reached: float | None  # rounds to the row's target; None = not reached
    rounds: int  # rounds run
    planned: int | None
    best_accuracy: float | None
    status: str
    seconds_per_round: float | None  # median over the rounds that were timed
    total_seconds: float | None  # the sum of its rounds' times (training and centralized evaluation)
    measured: str  # the date of its last round (UTC)
    records: list = dataclasses.field(repr=False, default_factory=list)


def configured_lr(config_path: Path) -> float:
    """The client learning rate a row's config sets (ConfigError, a UsageError, for a bad config)."""
    from fedmnist import config as config_lib

    return config_lib.load(config_path).client_optimizer.learning_rate


def configured_targets(config_path: Path) -> list[float]:
    """The accuracy targets a row's config sets."""
    from fedmnist import config as config_lib

    return list(config_lib.load(config_path).accuracy_targets)


def read_result(row: Row, lr: float, seed: int, path: Path) -> Result:
    """One run's result; RunError when the directory holds no rounds yet."""
    facts = run_facts(path, [row.target])
    records = facts["records"]
    stopped = _stopped_after_target(path)
    if stopped is not None:
        status = f"stopped {stopped} rounds after the target"
    elif facts["finished"]:
        status = "finished"
    else:
        status = f"unfinished ({records[-1].round} of {facts['planned_rounds'] or '?'} rounds)"
    timed = [r.seconds for r in records if isinstance(r.seconds, (int, float))]
    return Result(row.name, lr, seed, path, facts["targets"]["targets"][f"{row.target:g}"], records[-1].round,
                  facts["planned_rounds"], facts["targets"]["best_accuracy"], status,
                  statistics.median(timed) if timed else None,
                  # The rounds' own times: a resumed run's summary times only its last process.
                  sum(timed) if timed and len(timed) == len(records) else None,
                  _measured(path), records)


def _summary(path: Path) -> dict:
    """The run's summary.json; {} when it has none (unfinished) or it cannot be read."""
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _stopped_after_target(path: Path) -> int | None:
    """`stop_after_target` when the run stopped early for it (summary.json says so), else None."""
    stopped = _summary(path).get("stopped_after_target")
    return stopped.get("rounds_after") if isinstance(stopped, dict) else None


def _measured(path: Path) -> str:
    """The UTC date the run finished (summary.json's `finished_at`), else of its metrics file's last change
    (an unfinished run, or one finished before summaries had the date)."""
    finished = _summary(path).get("finished_at")
    if isinstance(finished, str) and len(finished) >= 10:
        return finished[:10]
    mtime = (path / METRICS_FILE).stat().st_mtime
    return datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).date().isoformat()


def collect(out: Path, rows: Mapping[str, Row]) -> dict[str, list[Result]]:
    """Every run of `rows` in `out`, by row, sorted by learning rate and seed; a directory without rounds yet
    is skipped with a line on stderr."""
    results: dict[str, list[Result]] = {name: [] for name in rows}
    for path in sorted(p for p in Path(out).iterdir() if p.is_dir()) if Path(out).is_dir() else []:
        match = RUN_NAME.match(path.name)
        if not match or match["row"] not in rows:
            continue
        try:
            lr = float(match["lr"])
        except ValueError:  # a name that only looks like a run's
            continue
        try:
            results[match["row"]].append(read_result(rows[match["row"]], lr, int(match["seed"]), path))
        except RunError as error:
            print(f"skipped {error}", file=sys.stderr)
    for found in results.values():
        found.sort(key=lambda r: (r.lr, r.seed))
    return results


def by_lr(results: Sequence[Result]) -> dict[float, list[Result]]:
    grouped: dict[float, list[Result]] = {}
    for result in results:
        grouped.setdefault(result.lr, []).append(result)
    return grouped


def decided(result: Result) -> bool:
    """Whether the run's rounds to target are known: it reached the target, or it ended without."""
    return result.reached is not None or not result.status.startswith("unfinished")


def best_lr(results: Sequence[Result]) -> float | None:
    """The learning rate with the fewest mean rounds to target (see the module's docstring), judged on its
    decided runs (an unfinished run that has not reached the target yet counts only when no run of its
    rate is decided) and, among the rates whose runs all reached it, on the seeds they all ran (a second
    seed at one rate neither helps nor hurts it against a rate run once); None if no run."""
    grouped = {lr: [r for r in runs if decided(r)] or runs for lr, runs in by_lr(results).items()}
    reaching = [runs for runs in grouped.values() if all(r.reached is not None for r in runs)]
    shared = set.intersection(*({r.seed for r in runs} for runs in reaching)) if reaching else set()

    def rank(item: tuple[float, list[Result]]) -> tuple:
        lr, runs = item
        if all(r.reached is not None for r in runs):
            compared = [r for r in runs if r.seed in shared] or runs
            return (0, statistics.mean(r.reached for r in compared), lr)
        return (1, -statistics.mean(r.best_accuracy or 0.0 for r in runs), lr)

    return min(grouped.items(), key=rank)[0] if grouped else None


# --- table.md ---------------------------------------------------------------------------------------

def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|",
            *["| " + " | ".join(cells) + " |" for cells in rows]]


def _rounds(result: Result) -> str:
    return targets_lib.describe(result.reached, result.rounds) + ("" if decided(result) else " (unfinished)")


def _seconds(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def summary_row(row: Row, results: Sequence[Result]) -> list[str]:
    """Paper rounds beside fedmnist's at the best learning rate (every seed's, and their mean's ratio)."""
    batch = "inf" if row.batch_size is None else str(row.batch_size)
    start = [row.name, row.model, row.method, str(row.epochs), batch, str(row.updates),
             "IID" if row.iid else "non-IID", f"{row.target:.0%}", f"{row.paper_rounds} ({row.table})"]
    lr = best_lr(results)
    if lr is None:
        return start + ["not run", "-", "-", "-", "-", "-", "-"]
    chosen = by_lr(results)[lr]
    rounds = ", ".join(_rounds(r) for r in chosen)
    reached = [r.reached for r in chosen if r.reached is not None]
    ratio = f"{statistics.mean(reached) / row.paper_rounds:.2f}" if len(reached) == len(chosen) else "-"
    per_round = [r.seconds_per_round for r in chosen if r.seconds_per_round is not None]
    totals = [r.total_seconds for r in chosen if r.total_seconds is not None]
    grid = ", ".join(f"{value:g}" for value in by_lr(results))
    return start + [rounds, ratio, f"{lr:g}", grid,
                    _seconds(statistics.mean(per_round)) if per_round else "-",
                    _duration(statistics.mean(totals)) if totals else "-",
                    max(r.measured for r in chosen)]


SUMMARY_HEADER = ("row", "model", "method", "E", "B", "u", "data", "target", "paper rounds",
                  "fedmnist rounds (best lr, each seed)", "ratio", "best lr", "lrs tried", "s/round",
                  "time per run", "measured")
RUNS_HEADER = ("row", "lr", "seed", "rounds to target", "best test accuracy", "rounds run", "status",
               "s/round", "total time", "measured", "run directory")


def render(rows: Mapping[str, Row], results: Mapping[str, Sequence[Result]], written: datetime.datetime) -> str:
    """table.md: the rows beside the paper's, then every run of the grid."""
    every = [r for name in rows for r in results[name]]
    lines = [f"# {PAPER}, measured with fedmnist", "",
             f"Written {written:%Y-%m-%d %H:%M} UTC by `fedmnist reproduce` from the run directories beside "
             f"this file. Rounds to target: the round at which the best centralized test accuracy so far "
             f"first reaches the target, interpolated between rounds (fedmnist/outputs/targets.py). Best lr: "
             f"the fewest rounds to target, mean over the seeds every rate that reached it ran. Ratio: fedmnist's "
             f"mean rounds (all the best lr's seeds) / the paper's. "
             f"s/round: median round time (training and centralized evaluation), mean over the best lr's seeds; "
             f"time: the sum of a run's round times (start-up and the final evaluation not counted).",
             "", *_markdown(SUMMARY_HEADER, [summary_row(rows[name], results[name]) for name in rows]),
             "", "## Every run", ""]
    lines += _markdown(RUNS_HEADER, [
        [r.row, f"{r.lr:g}", str(r.seed), _rounds(r),
         "-" if r.best_accuracy is None else f"{r.best_accuracy:.4f}", str(r.rounds), r.status,
         _seconds(r.seconds_per_round), _duration(r.total_seconds), r.measured, r.path.name] for r in every])
    if not every:
        lines.append("\n(no runs yet)")
    return "\n".join(lines) + "\n"


# --- curves.png -----------------------------------------------------------------------------------

def plot(rows: Mapping[str, Row], results: Mapping[str, Sequence[Result]]) -> Figure:
    """Centralized test accuracy against rounds for every row at its best learning rate (its first seed),
    one panel per model with its target as a horizontal line, as the paper's Figure 2."""
    run = {row.model for name, row in rows.items() if results[name]}  # panels for the models with runs
    models = [m for m in ("CNN", "2NN") if m in run or (not run and any(r.model == m for r in rows.values()))]
    models = models or ["CNN"]
    figure = Figure(figsize=(6 * len(models), 4.5), dpi=80, layout="constrained")
    axes_by_model = dict(zip(models, figure.subplots(1, len(models), squeeze=False)[0]))
    for index, (name, row) in enumerate(rows.items()):
        lr = best_lr(results[name])
        if lr is None:
            continue
        first = by_lr(results[name])[lr][0]
        rounds, values = series(first.records, CENTRALIZED_EVALUATION.path, ACCURACY)
        axes_by_model[row.model].plot(rounds, values, "-" if row.iid else "--", color=f"C{index % 10}",
                                      label=f"{row.describe()}, lr {lr:g}")
    for model, axes in axes_by_model.items():
        target = next((row.target for row in rows.values() if row.model == model), 0.99)
        axes.axhline(target, color="0.4", linewidth=0.8, zorder=0)
        axes.set_ylim(target - 0.06, 1.0)
        axes.set_xscale("log")  # 20 rounds and 600 in one panel, as the paper's rows differ 30-fold
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.set_xlabel("communication rounds")
        axes.set_ylabel(f"test accuracy ({CENTRALIZED_EVALUATION.name})")
        axes.set_title(f"MNIST {model}, target {target:.0%} (grey line)")
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="lower right", fontsize="small")
    return figure


def write(out: Path, rows: Mapping[str, Row], now: datetime.datetime | None = None) -> list[Path]:
    """Writes (replaces) `out/table.md` and `out/curves.png`, both derived from the runs in `out`."""
    out = Path(out)
    if not out.is_dir():
        from fedmnist.errors import UsageError

        raise UsageError(f"--out {out}: no such directory (no runs to tabulate)")
    results = collect(out, rows)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    table_path, curves_path = out / TABLE_FILE, out / CURVES_FILE
    # Each replaced whole: an interrupted write leaves the previous file.
    replace_atomically(table_path, render(rows, results, now).encode())
    replace_atomically(curves_path, png_bytes(plot(rows, results)))
    return [table_path, curves_path]


def export(out: Path, dest: Path, rows: Mapping[str, Row]) -> list[Path]:
    """Copies each run's records in `out` (RECORD_FILES: no checkpoints, no event files) to `dest/<run>/`,
    replacing older copies there, and writes `dest`'s table.md and curves.png from them: the table's runs,
    small enough to keep with the table (docs/mcmahan2017-runs/) and rebuild it with `--table-only`."""
    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for results in collect(out, rows).values():
        for result in results:
            copy = dest / result.path.name
            copy.mkdir(parents=True, exist_ok=True)
            for name in RECORD_FILES:
                source = result.path / name
                if source.is_file():
                    replace_atomically(copy / name, source.read_bytes())
                    stat = source.stat()
                    os.utime(copy / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the date of an unfinished run
                elif (copy / name).is_file():  # a summary copied before the run was resumed
                    (copy / name).unlink()
    return write(dest, rows)
