"""Step 6 of the article: the command line. `python -m fedmnist.train --help` lists the options.

`--tensorboard` serves the run in TensorBoard while it trains and afterwards, until Ctrl-C.

Exit codes: 0 done, 2 usage or configuration error, 1 runtime failure, 130 interrupted. Errors are
one line on stderr; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from fedmnist import config as config_lib
from fedmnist import registry
from fedmnist.cli import ArgumentParser, own_temporary_directory, remove_own_temporary_directory
from fedmnist.errors import FedmnistError, Interrupted, TrainingDivergedError, UsageError, WorkerFailedError
from fedmnist.outputs import run_directory

RUNS_ROOT = Path("runs")
STALL_POLL_SECONDS = 0.5
# `uv run` without a terminal (a CI job, a supervisor or `kill` signalling the process group) forwards to the
# command a SIGINT or SIGTERM that the command already received with its group: the same signal twice,
# 0.2 s apart (SIGINT) or at once (SIGTERM), and later when the machine is busy (more than 0.5 s once in a
# test suite's run, docs/runs.md). A repeat this soon is that same request, not "again".
SAME_SIGNAL_SECONDS = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m fedmnist.train",
                     description="Federated averaging on federated EMNIST (or offline digits), as in the TFF tutorial.")
    parser.add_argument("--config", help="YAML config file (default: the tutorial's settings)")
    parser.add_argument("--rounds", type=int, help="number of federated rounds")
    parser.add_argument("--clients-per-round", type=int, help="clients that train in each round")
    parser.add_argument("--dataset", help=f"one of: {', '.join(registry.SOURCES.names())}")
    parser.add_argument("--algorithm", help=f"one of: {', '.join(registry.ALGORITHMS.names())}")
    parser.add_argument("--model", help="linear, cnn, 2nn, or your own Keras model as module:function")
    parser.add_argument("--seed", type=int, help="seed for data splits, sampling and initial weights")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config key, e.g. --set client_optimizer.learning_rate=0.1")
    parser.add_argument("--run-dir", type=Path, help="output directory (default: runs/<name>-<timestamp>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue a stopped run from its last checkpoint, with its own config "
                             "(--rounds may extend it)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--tensorboard", action="store_true",
                        help="serve the run in TensorBoard on 127.0.0.1 while it trains and afterwards, until Ctrl-C")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    named = {"rounds": args.rounds, "clients_per_round": args.clients_per_round,
             "data.dataset": args.dataset, "algorithm": args.algorithm, "model": args.model, "seed": args.seed}
    return [f"{key}={value}" for key, value in named.items() if value is not None] + args.set


def make_run_dir(requested: Path | None, name: str) -> Path:
    """The run directory, created if missing."""
    if requested is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = RUNS_ROOT / f"{name}-{stamp}"
        for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
            candidate = Path(f"{base}{suffix}")
            try:
                candidate.mkdir(parents=True)
                return candidate
            except FileExistsError:
                continue
        raise UsageError(f"too many runs named {base}; pass --run-dir")
    if requested.exists() and not requested.is_dir():
        raise UsageError(f"--run-dir {requested} is a file, not a directory")
    try:
        requested.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create run directory {requested}: {error.strerror}") from None
    return requested


def prepare_run_dir(requested: Path | None, name: str, overwrite: bool) -> Path:
    """A new, empty run directory, for notebooks and scripts that write a run themselves (the command also
    locks it while it trains): an existing run in it is replaced only with `overwrite`."""
    run_dir = make_run_dir(requested, name)
    if check_new_run_dir(run_dir, overwrite):
        run_directory.clear(run_dir)
    return run_dir


def check_new_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Whether `run_dir` holds something (its lock aside) that a new run must clear; an existing run in it
    is replaced only with --overwrite, and only when it looks like a fedmnist run. Checked before the lock
    is taken, so a refused command leaves the directory as it was."""
    if not any(entry.name != run_directory.LOCK_FILE for entry in run_dir.iterdir()):
        return False
    holder = run_directory.holder(run_dir)
    if holder:
        raise run_directory.in_use(run_dir, holder)
    if not overwrite:
        raise UsageError(f"run directory {run_dir} already exists; choose another --run-dir "
                         f"or pass --overwrite to replace it")
    if not run_directory.looks_like_run(run_dir):
        raise UsageError(f"--overwrite refused: {run_dir} does not look like a fedmnist run directory")
    return True


def load_run_config(run_dir: Path, rounds: int | None) -> config_lib.Config:
    """The config a run was started with (its config.yaml), optionally with more rounds."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: not a fedmnist run directory (no config.yaml)")
    values = config_lib.read_yaml(path)
    values.pop("versions", None)
    if rounds is not None:
        values["rounds"] = rounds
    config = config_lib.from_dict(values)
    config_lib.check_consistency(config)
    return config


def check_resume_args(args: argparse.Namespace) -> None:
    changed = [flag for flag, value in (("--config", args.config), ("--dataset", args.dataset),
                                        ("--algorithm", args.algorithm),
                                        ("--model", args.model), ("--seed", args.seed),
                                        ("--clients-per-round", args.clients_per_round),
                                        ("--set", args.set), ("--run-dir", args.run_dir),
                                        ("--overwrite", args.overwrite)) if value]
    if changed:
        raise UsageError(f"--resume continues a run with its own config; {changed[0]} cannot be combined "
                         f"with it (only --rounds can)")


# Ctrl-C, `kill`, and the terminal closing (SIGHUP) all stop the run the same way.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """First SIGINT/SIGTERM/SIGHUP: stop after the current round. Second (the same signal within
    `SAME_SIGNAL_SECONDS` is the first one again): stop now. Stalled workers: stop now, also when they stall
    after the first signal (the round it waits for would never end)."""

    def __init__(self):
        self.requested = False
        self.first: tuple[int, float] | None = None  # the first signal and when it came
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if _workers_stalled():
            raise KeyboardInterrupt("interrupted: the round cannot finish, its worker does not answer")
        now = time.monotonic()
        if self.requested:
            first_signum, first_at = self.first
            if signum == first_signum and now - first_at < SAME_SIGNAL_SECONDS:
                return  # the first one again, forwarded by `uv run`
            raise KeyboardInterrupt
        self.requested, self.first = True, (signum, now)
        print(f"\n{signal.Signals(signum).name}: stopping after the current round "
              f"(signal again to stop at once)", file=sys.stderr)
        threading.Thread(target=self._signal_again_if_stalled, args=(signum,), name="stop when stalled",
                         daemon=True).start()

    @staticmethod
    def _signal_again_if_stalled(signum: int) -> None:
        """Waits for the requested stop; if a worker stalls first, signals this process again, so the
        handler stops at once (a signal also wakes the main thread from its wait on the round)."""
        while not _workers_stalled():
            time.sleep(STALL_POLL_SECONDS)
        os.kill(os.getpid(), signum)

    def __call__(self) -> bool:
        return self.requested

    @staticmethod
    def restore_defaults() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _workers_stalled() -> bool:
    """True when the run's workers are lost or silent: then the current round would never end."""
    contexts = sys.modules.get("fedmnist.runtime.contexts")  # loaded once a run has started
    active = contexts.active_runtime() if contexts else None
    return bool(active and active.stalled())


def main(argv: list[str] | None = None) -> int:
    args = run_dir = None
    try:
        args = build_parser().parse_args(argv)
        if not args.debug:
            # TensorFlow's C++ start-up lines (cuDNN/cuFFT/cuBLAS factories on a CPU-only machine) would
            # break the one-line promise of stderr, whatever the caller exported; --debug shows them.
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        if args.resume:
            check_resume_args(args)
            run_dir, replace = args.resume, False
            config = load_run_config(run_dir, args.rounds)
        else:
            config = config_lib.load(args.config, overrides_from_args(args))
            run_dir = make_run_dir(args.run_dir, config.name)
            replace = check_new_run_dir(run_dir, args.overwrite)
        with run_directory.locked(run_dir):
            # Only now is what the directory holds this command's: a command refused the lock leaves it alone,
            # and a failed start removes its own files while it still holds the lock.
            created = not args.resume
            if replace:
                run_directory.clear(run_dir)
            try:
                train_and_serve(args, config, run_dir)
            finally:
                if created and not run_directory.has_rounds(run_dir):
                    remove_unstarted(run_dir)
        return 0
    except KeyboardInterrupt as error:
        return _interrupted(str(error) or "interrupted during a round", run_dir)
    except Interrupted as error:
        return _interrupted(str(error), run_dir)
    except WorkerFailedError as error:
        saved = f"the state after round {error.saved_round} is saved" if error.saved_round else "no round completed"
        return _fail(f"{error}; {saved}{resume_hint(run_dir)}", 1, args, error)
    except TrainingDivergedError as error:
        saved = (f"the state after round {error.saved_round}, the last good one, is saved in {run_dir}"
                 if error.saved_round else "no round completed")
        return _fail(f"{error}; {saved}", 1, args, error)
    except FedmnistError as error:
        return _fail(error, error.exit_code, args)
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        return _fail(f"cannot write{where}: {error.strerror or error}", 1, args, error)
    except Exception as error:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1.
        return _fail(error, 1, args)


def train_and_serve(args: argparse.Namespace, config: config_lib.Config, run_dir: Path) -> None:
    """The run, with TensorBoard serving it while it trains and afterwards when asked (--tensorboard)."""
    stop = StopRequest()
    print(f"run directory: {run_dir}", flush=True)
    from fedmnist.imports import long_lived_imports

    with long_lived_imports():
        from fedmnist import loop  # TensorFlow starts here, after the config is known to be good.

    server = None
    if args.tensorboard:
        from fedmnist.outputs import dashboard

        server = dashboard.TensorBoardServer(run_dir, port=dashboard.pick_port())
        print(f"TensorBoard: {server.url}", flush=True)
    try:
        loop.train(config, run_dir, progress=not args.quiet, resume=bool(args.resume), stop_requested=stop)
        stop.restore_defaults()  # training is over: Ctrl-C now just stops TensorBoard
        if server is not None and not stop():  # a Ctrl-C while the run was finishing means: done, do not serve
            dashboard.serve_until_interrupted(server.wait_ready(), echo=lambda line: print(line, flush=True))
    finally:
        if server is not None:
            server.stop()


def remove_unstarted(run_dir: Path) -> None:
    """A run that failed before its first round leaves nothing behind: its directory goes (or, when the
    directory was there before, what this command put in it)."""
    try:
        run_directory.clear(run_dir)
        (run_dir / run_directory.LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError:
        pass


def resume_command(run_dir: Path) -> str:
    """The command that resumes `run_dir`, as the user can paste it where they stand: through uv when this
    command runs under `uv run`, through the `fedmnist` script when that is what they typed."""
    target = shlex.quote(str(run_dir))
    if Path(sys.argv[0]).name == "fedmnist":
        return f"fedmnist train --resume {target}"
    prefix = "uv run " if os.environ.get("UV") else ""
    return f"{prefix}python -m fedmnist.train --resume {target}"


def resume_hint(run_dir: Path | None) -> str:
    if run_dir is None or not run_directory.has_rounds(run_dir):
        return ""
    return f"; resume with: {resume_command(run_dir)}"


def _interrupted(what: str, run_dir: Path | None) -> int:
    print(f"{what}{resume_hint(run_dir)}", file=sys.stderr)
    return 130


def _fail(error: Exception | str, code: int, args: argparse.Namespace | None,
          cause: BaseException | None = None) -> int:
    if args is not None and args.debug:
        traceback.print_exception(cause or error)
    print(f"error: {error}", file=sys.stderr)
    return code


def exit_now(code: int) -> None:
    """Exits without Python's interpreter teardown, which with TensorFlow loaded takes over a second
    and does nothing a finished command needs: by now every file is written and closed and every
    worker stopped (and a worker outliving us would be killed by the kernel, see fedmnist.runtime).
    What it would have removed, the command's own temporary directory (`cli.own_temporary_directory`),
    goes here."""
    sys.stdout.flush()
    sys.stderr.flush()
    remove_own_temporary_directory()
    os._exit(code)


if __name__ == "__main__":
    with own_temporary_directory():
        exit_now(main())
