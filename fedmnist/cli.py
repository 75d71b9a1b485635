"""What every fedmnist command shares: one-line usage errors (exit 2) instead of argparse's two, with a
"did you mean" for a mistyped option, usage lines that name the command as the user typed it, and a
temporary directory of its own."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import shutil
import tempfile
from collections.abc import Iterator

from fedmnist.errors import UsageError

_UNRECOGNIZED = "unrecognized arguments: "
_program: str | None = None  # "fedmnist train" while the `fedmnist` command runs `train`
_own_temporary_directory: str | None = None  # `own_temporary_directory`'s, while a command runs


class ArgumentParser(argparse.ArgumentParser):
    """Raises `UsageError` instead of printing the usage block and exiting. Its `prog` is the command as the
    user typed it: `python -m fedmnist.train`, or `fedmnist train` when the `fedmnist` command runs it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if _program is not None:
            self.prog = _program

    def error(self, message: str) -> None:
        raise UsageError(f"{message}{self._did_you_mean(message)} (see --help)")

    def _did_you_mean(self, message: str) -> str:
        """` (did you mean --clients-per-round?)` for `--clients_per_round` or another near miss."""
        if not message.startswith(_UNRECOGNIZED):
            return ""
        options = sorted(option for option in self._option_string_actions if option.startswith("--"))
        hints = {}
        for word in message[len(_UNRECOGNIZED):].split():
            name = word.split("=", 1)[0]
            if not name.startswith("--"):
                continue
            spelled = "--" + name[2:].replace("_", "-").lower()
            close = ([spelled] if spelled in options
                     else difflib.get_close_matches(spelled, options, n=1, cutoff=0.75))
            if close:
                hints[name] = close[0]
        if len(hints) == 1:
            return f" (did you mean {next(iter(hints.values()))}?)"
        return (" (did you mean " + ", ".join(f"{right} for {wrong}" for wrong, right in hints.items()) + "?)"
                if hints else "")


@contextlib.contextmanager
def own_temporary_directory() -> Iterator[None]:
    """Sends the command's temporary files to a directory of its own, removed on the way out (and by
    `fedmnist.train.exit_now`, which leaves without unwinding this).

    TensorFlow's AutoGraph writes every function it converts to a module file in the temporary directory,
    which an `atexit` handler deletes (`exit_now` skips it), and Python caches the module's bytecode beside
    it, in `__pycache__`, which nothing deletes: without this, every run left a dozen files or more in /tmp
    for good. Python's `tempfile.tempdir` is the documented way to move them; the environment, and so the
    workers and other programs, keep theirs."""
    global _own_temporary_directory
    saved = tempfile.tempdir
    _own_temporary_directory = tempfile.tempdir = tempfile.mkdtemp(prefix="fedmnist-")
    try:
        yield
    finally:
        tempfile.tempdir = saved
        remove_own_temporary_directory()


def remove_own_temporary_directory() -> None:
    global _own_temporary_directory
    if _own_temporary_directory is not None:
        shutil.rmtree(_own_temporary_directory, ignore_errors=True)
        _own_temporary_directory = None


@contextlib.contextmanager
def program(name: str) -> Iterator[None]:
    """Parsers made inside name their command `name` (e.g. "fedmnist train") in usage and help."""
    global _program
    saved, _program = _program, name
    try:
        yield
    finally:
        _program = saved


COMMANDS = {
    "train": ("fedmnist.train", "train a model: the article's rounds, evaluation and outputs"),
    "report": ("fedmnist.outputs.report", "final metrics of runs as a table, and their accuracy curves"),
    "describe": ("fedmnist.data.population", "what a configured federated population looks like"),
    "worker": ("fedmnist.runtime.worker", "serve a TFF worker for other processes' runs"),
    "bench": ("fedmnist.bench.main", "measure speed and memory against the plain-TensorFlow floor"),
    "reproduce": ("fedmnist.reproduce", "a paper's table (mcmahan2017) from normal runs over a grid of rates"),
}


def main(argv: list[str] | None = None) -> int:
    """`fedmnist COMMAND ...`: the console script; `python -m fedmnist.train` and the other
    `python -m` forms run the same commands."""
    import importlib
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:9s} {text}" for name, (_, text) in COMMANDS.items())
        stream = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r} (see --help)", file=stream)
        else:
            print(f"usage: fedmnist COMMAND [ARGS]\n\ncommands:\n{usage}\n\n"
                  "`fedmnist COMMAND --help` describes each.", file=stream)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, args = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    with own_temporary_directory(), program(f"fedmnist {name}"):
        code = module.main(args)
        if name in ("train", "reproduce"):  # TensorFlow is loaded: skip its slow teardown
            importlib.import_module("fedmnist.train").exit_now(code)
    return code
