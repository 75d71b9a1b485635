"""`python -m fedmnist.reproduce mcmahan2017`: a paper's table, measured with normal runs.

Each (row, learning rate, seed) is a normal run directory, `OUT/<row>-lr<lr>-seed<seed>`, trained by
`fedmnist.train` with the row's config (`configs/mcmahan2017/<row>.yaml`) and
`--set client_optimizer.learning_rate=LR --set seed=SEED`: viewable in TensorBoard (`tensorboard --logdir OUT`)
and reported by `fedmnist report`. Running the command again skips finished runs (they have a summary.json),
resumes unfinished ones with the package's own resume, and starts the missing ones. Then it writes
`OUT/table.md` (fedmnist/paper/table.py) and `OUT/curves.png` for every row of the paper found in OUT (rows
without runs say so); `--table-only` only rewrites those two from the run directories there. `--export DIR`
also copies each run's records (config.yaml, metrics.jsonl, summary.json; not its checkpoints) to
`DIR/<run>/` and writes DIR's table and figure from them: small enough to keep with the table
(docs/mcmahan2017-runs/), where `--table-only --out DIR` rebuilds it.

`--stop-after-target N` stops each run N rounds after its centralized test accuracy first reaches the row's
target (config `stop_after_target`): rounds to target depend only on the rounds up to the crossing, so they are
exact; runs that never reach it play every round.

Exit codes: 0 done, 2 bad usage (one line on stderr), 1 a run failed (the others still ran, the table is
written), 130 interrupted (resume by running the same command again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from fedmnist.cli import ArgumentParser
from fedmnist.errors import ConfigError, UsageError
from fedmnist.outputs import run_directory
from fedmnist.paper import mcmahan2017, table

PAPERS = {"mcmahan2017": (mcmahan2017.ROWS, Path("configs") / "mcmahan2017")}
DEFAULT_OUT = Path("runs") / "mcmahan2017"
INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedmnist.reproduce", allow_abbrev=False,  # --lr is not --lrs
                            description="Run a paper's rows as normal fedmnist runs over a grid of client "
                                        "learning rates and seeds, then write table.md and curves.png.")
    parser.add_argument("paper", metavar="PAPER", help=f"one of: {', '.join(PAPERS)}")
    parser.add_argument("--rows", nargs="+", metavar="ROW",
                        help="rows to run (config names, e.g. cnn-fedavg-e5-b10-iid; default: every row)")
    parser.add_argument("--lrs", metavar="LR,LR,...",
                        help="client learning rates, comma-separated, or `best`: each row's best so far in --out "
                             "(default: each row's config's)")
    parser.add_argument("--seeds", default="0", metavar="SEED,SEED,...", help="seeds, comma-separated (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where the runs go (default {DEFAULT_OUT})")
    parser.add_argument("--rounds", type=int, help="rounds per run (default: each row's config's)")
    parser.add_argument("--stop-after-target", type=int, metavar="N",
                        help="stop a run N rounds after it reaches the row's target (default: play every round)")
    parser.add_argument("--configs", type=Path, help="the rows' config folder (default configs/<paper>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another config override for every new run, e.g. data.cache_dir=DIR")
    parser.add_argument("--table-only", action="store_true",
                        help="train nothing: rewrite table.md and curves.png from the run directories in --out")
    parser.add_argument("--export", type=Path, metavar="DIR",
                        help="also copy each run's records (config.yaml, metrics.jsonl, summary.json; no "
                             "checkpoints) to DIR/<run>/ and write DIR's table.md and curves.png from them")
    parser.add_argument("--quiet", action="store_true", help="only this command's own lines, not each round's")
    return parser


def parse_list(text: str, kind: type, flag: str) -> list:
    """`0.02,0.05` -> [0.02, 0.05]; a UsageError naming `flag` for anything else."""
    values = []
    for part in text.split(","):
        try:
            value = kind(part.strip())
        except ValueError:
            raise UsageError(f"{flag} {text}: {part.strip()!r} is not a {'number' if kind is float else 'whole number'}"
                             f" (give a comma-separated list, e.g. {flag} {'0.02,0.05' if kind is float else '0,1'})"
                             ) from None
        if (kind is float and not 0 < value < float("inf")) or (kind is int and value < 0):
            raise UsageError(f"{flag} {text}: {part.strip()} is out of range "
                             f"({'a learning rate is > 0' if kind is float else 'a seed is >= 0'})")
        if value not in values:
            values.append(value)
    return values


def check_args(args: argparse.Namespace) -> tuple[dict, list[str], Path]:
    """The paper's rows, the rows asked for and the config folder; UsageError for anything wrong."""
    if args.paper not in PAPERS:
        raise UsageError(f"unknown paper {args.paper!r}; known: {', '.join(PAPERS)}")
    rows, default_configs = PAPERS[args.paper]
    wanted = args.rows or list(rows)
    unknown = [name for name in wanted if name not in rows]
    if unknown:
        raise UsageError(f"--rows: unknown row {unknown[0]!r}; rows: {', '.join(rows)}")
    for flag, value, least in (("--rounds", args.rounds, 1), ("--stop-after-target", args.stop_after_target, 0)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value}: must be at least {least}")
    configs = args.configs or default_configs
    if not args.table_only:
        missing = [name for name in wanted if not (configs / f"{name}.yaml").is_file()]
        if missing:
            raise UsageError(f"no config {configs / (missing[0] + '.yaml')}; run from the project folder "
                             f"or pass --configs")
    for flag, path in (("--out", args.out), ("--export", args.export)):
        if path is not None and path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} is a file, not a directory")
    if args.export is not None and args.export.resolve() == args.out.resolve():
        raise UsageError(f"--export {args.export} is --out itself; give another directory")
    return rows, wanted, configs


def best_lrs(out: Path, rows: dict) -> dict[str, list[float]]:
    """`--lrs best`: each row's best learning rate among its runs in `out` (for more seeds at it)."""
    found = table.collect(out, rows)
    best = {name: table.best_lr(results) for name, results in found.items()}
    missing = [name for name, lr in best.items() if lr is None]
    if missing:
        raise UsageError(f"--lrs best: row {missing[0]} has no runs in {out} yet; give its rates")
    return {name: [lr] for name, lr in best.items()}


def run_name(row: str, lr: float, seed: int) -> str:
    """`cnn-fedavg-e5-b10-iid-lr0.05-seed0`: the run's directory under --out."""
    return f"{row}-lr{lr:g}-seed{seed}"


def train_argv(config: Path, target: float, lr: float, seed: int, run_dir: Path,
               args: argparse.Namespace) -> list[str]:
    """`fedmnist.train`'s arguments for a new run: the row's config with this grid point's overrides."""
    argv = ["--config", str(config), "--set", f"client_optimizer.learning_rate={lr:g}", "--set", f"seed={seed}"]
    if args.stop_after_target is not None:
        # The run stops after its highest target: keep only the targets up to the row's (a 2NN row's 97%,
        # where its config also lists 99%, which the 2NN may never reach).
        targets = [t for t in table.configured_targets(config) if t <= target] or [target]
        argv += ["--set", f"stop_after_target={args.stop_after_target}",
                 "--set", f"accuracy_targets=[{', '.join(f'{t:g}' for t in targets)}]"]
    if args.rounds is not None:
        argv += ["--rounds", str(args.rounds)]
    for assignment in args.set:
        argv += ["--set", assignment]
    return argv + ["--run-dir", str(run_dir), "--quiet"]


def train(argv: list[str], quiet: bool) -> int:
    """`fedmnist.train` in this process (TensorFlow starts once for the whole grid); its error line goes to
    stderr either way, its round lines to stdout unless `quiet`."""
    from fedmnist import train as train_command

    out = io.StringIO() if quiet else sys.stdout
    with contextlib.redirect_stdout(out):
        code = train_command.main(argv)
    import tensorflow as tf

    tf.keras.backend.clear_session()  # the next run builds its models afresh, without this one's graphs
    return code


def run_grid(args: argparse.Namespace, rows: dict, wanted: list[str], configs: Path,
             lrs: dict[str, list[float]], seeds: list[int]) -> int:
    """Trains every missing or unfinished run of the grid, row by row; 0, 1 (a run failed) or 130."""
    failed = 0
    for row in wanted:
        for lr in lrs[row]:
            for seed in seeds:
                run_dir = args.out / run_name(row, lr, seed)
                if (run_dir / table.SUMMARY_FILE).is_file():
                    print(f"done already: {run_dir}", flush=True)
                    continue
                if run_directory.has_rounds(run_dir):
                    print(f"resuming: {run_dir}", flush=True)
                    argv = ["--resume", str(run_dir), "--quiet"]
                    if args.rounds is not None:
                        argv += ["--rounds", str(args.rounds)]
                else:
                    print(f"training: {run_dir}", flush=True)
                    argv = train_argv(configs / f"{row}.yaml", rows[row].target, lr, seed, run_dir, args)
                code = train(argv, args.quiet)
                if code == INTERRUPTED:
                    print("interrupted; run the same command again to resume", file=sys.stderr)
                    return INTERRUPTED
                failed += code != 0
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        rows, wanted, configs = check_args(args)
        seeds = parse_list(args.seeds, int, "--seeds")
        if args.lrs == "best":
            lrs = best_lrs(args.out, {name: rows[name] for name in wanted})
        elif args.lrs is not None:
            grid = parse_list(args.lrs, float, "--lrs")
            lrs = {row: grid for row in wanted}
        else:
            lrs = {row: [] if args.table_only else [table.configured_lr(configs / f"{row}.yaml")] for row in wanted}
        code = 0
        if not args.table_only:
            args.out.mkdir(parents=True, exist_ok=True)
            code = run_grid(args, rows, wanted, configs, lrs, seeds)
            if code == INTERRUPTED:
                return code
        written = table.write(args.out, rows)  # every row: those not run yet say so
        if args.export is not None:
            written += table.export(args.out, args.export, rows)
        for path in written:
            print(f"wrote {path}")
        return code
    except (UsageError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return INTERRUPTED
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        print(f"error: cannot write{where}: {error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from fedmnist.cli import own_temporary_directory
    from fedmnist.train import exit_now  # TensorFlow is loaded: skip its slow teardown, as `fedmnist train`

    with own_temporary_directory():
        exit_now(main())
