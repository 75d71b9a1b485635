"""Every noised aggregate a differentially private mode computes, counted on disk before it is computed.

A round played again releases a second noised view of its clients' data: after a resume (the rounds logged
since the last checkpoint run again), or after a worker restart inside a round. Epsilon must count every
release that ever left the aggregator, not the rounds of the final log. So a mode appends a line to
`RUN_DIR/privacy_releases.jsonl`, and flushes it to disk, *before* each aggregation; epsilon is computed from
the number of lines. A crash between the line and the aggregation over-counts one release, never
under-counts; the file is never trimmed by a resume (a new run, or --overwrite, starts it afresh).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RELEASES_FILE = "privacy_releases.jsonl"


class ReleaseLedger:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RELEASES_FILE

    def count(self) -> int:
        """Releases so far, a line cut by a crash included (it may have been released)."""
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_bytes().splitlines() if line.strip())

    def record(self, round_num: int) -> int:
        """Counts a release about to be computed for `round_num`, on disk; returns the count with it."""
        with open(self.path, "a") as stream:
            stream.write(json.dumps({"round": round_num}) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        return self.count()
