"""`metrics.jsonl`: one `RoundRecord` per line, appended and flushed as each round ends; `summary.json`.

A crash can cut the last line (a round half written); reading drops that partial record, and a resume
says so. Every rewrite goes to a new file that replaces the old one only once it is whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmnist.errors import DamagedFileError
from fedmnist.outputs.records import METRICS_FILE, RoundRecord


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, record: RoundRecord) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(record.to_json(), allow_nan=True) + "\n")

    def drop_after(self, round_num: int, warn: Callable[[str], None] = lambda line: None) -> None:
        """Keeps only rows up to `round_num` (rounds after the checkpoint a run resumes from), and no cut
        last line."""
        torn: list[str] = []
        rows = self.rows(on_torn=torn.append)
        kept = [row for row in rows if row["round"] <= round_num]
        for message in torn:
            warn(f"warning: {message}")
        if len(kept) != len(rows) or torn:
            replace_atomically(self.path, "".join(json.dumps(row, allow_nan=True) + "\n" for row in kept).encode())

    def rows(self, on_torn: Callable[[str], None] = lambda message: None) -> list[dict]:
        """The logged rounds as JSON objects. A last line cut short by a crash is left out (`on_torn` hears
        of it); a damaged line before the last is an error naming the file and line."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("round"), int):
                    raise ValueError("no round number")
            except ValueError:
                if number == len(lines):
                    on_torn(f"{self.path.name}: its last line (round {len(rows) + 1}?) was cut short, as by a "
                            f"crash while writing it; dropped")
                    break
                raise DamagedFileError(f"{self.path} line {number} is not a round record: the log is damaged "
                                      f"before its end; move the file aside to resume without it") from None
            rows.append(row)
        return rows

    def records(self) -> list[RoundRecord]:
        return [RoundRecord.from_json(row) for row in self.rows()]


def replace_with(path: Path, write: Callable[[Path], Any]) -> None:
    """Has `write` make a new file beside `path`, syncs it to disk and renames it over `path`: a crash or a
    full disk leaves the old file or the new one, whole, never a cut one. The new file's name keeps the
    suffix (`.partial-model.keras`), which some writers require."""
    temporary = path.with_name(f".partial-{path.name}")
    try:
        write(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_atomically(path: Path, content: bytes) -> None:
    """`path` replaced by `content`, whole or not at all (`replace_with`)."""
    replace_with(path, lambda temporary: temporary.write_bytes(content))


def write_json(path: Path, value: Any) -> None:
    replace_atomically(Path(path), (json.dumps(value, indent=2, allow_nan=True) + "\n").encode())
