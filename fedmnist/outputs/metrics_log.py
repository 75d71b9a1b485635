"""`metrics.jsonl`: one `RoundRecord` per line, appended and flushed as each round ends; `summary.json`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedmnist.outputs.records import METRICS_FILE, RoundRecord


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS_FILE

    def append(self, record: RoundRecord) -> None:
        with self.path.open("a") as stream:
            stream.write(json.dumps(record.to_json(), allow_nan=True) + "\n")

    def drop_after(self, round_num: int) -> None:
        """Keeps only rows up to `round_num` (rounds after the checkpoint a run resumes from)."""
        rows = self.rows()
        kept = [row for row in rows if row["round"] <= round_num]
        if len(kept) != len(rows):
            replace_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def rows(self) -> list[dict]:
        """The logged rounds as JSON objects."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def records(self) -> list[RoundRecord]:
        return [RoundRecord.from_json(row) for row in self.rows()]


def replace_atomically(path: Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def write_json(path: Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=2, allow_nan=True) + "\n")
