"""What every fedmnist command shares: one-line usage errors (exit 2) instead of argparse's two."""

from __future__ import annotations

import argparse

from fedmnist.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """Raises `UsageError` instead of printing the usage block and exiting."""

    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see --help)")


COMMANDS = {
    "train": ("fedmnist.train", "train a model: the article's rounds, evaluation and outputs"),
    "report": ("fedmnist.outputs.report", "final metrics of runs as a table, and their accuracy curves"),
    "describe": ("fedmnist.data.population", "what a configured federated population looks like"),
    "worker": ("fedmnist.runtime.worker", "serve a TFF worker for other processes' runs"),
    "bench": ("fedmnist.bench.main", "measure speed and memory against the plain-TensorFlow floor"),
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
    if name == "describe":
        args = ["describe", *args]
    code = module.main(args)
    if name == "train":
        module.exit_now(code)
    return code
