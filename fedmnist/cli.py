"""What every fedmnist command shares: one-line usage errors (exit 2) instead of argparse's two."""

from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """Raises `UsageError` instead of printing the usage block and exiting."""

    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see --help)")
