"""The interface of an aggregation mode, and what it gives the round loop.

A mode is built from the config (`Mode(config)`), checks its section before TensorFlow loads (`check`),
builds the training process from the parts the experiment hands it (`build`), and reports: a header line,
each round's figures and console line, and its part of summary.json. Its accounting (epsilon), its
sampling (`secret_sample_rate`) and what a round's randomness is keyed by (`Training.begin_round`) are
its own too, so nothing outside a mode asks which mode it is.

Each round reports `upload_bytes_per_client`: what one client sends for its update. Float32 modes send
4 bytes per weight, and weighted ones the 4-byte example weight besides; the other modes count what
their encoders or protocol really send.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from fedmnist.config import Config
    from fedmnist.privacy.ledger import ReleaseLedger
    from fedmnist.process import ProcessBuilder

COVERS = ("the model updates only: the local-training metrics, participation, federated evaluation and a "
          "centralized evaluation on a test set pooled from clients' data (every source but MNIST), computed on "
          "clients' data, are not covered by the guarantee")
NOT_COVERED = " (not covered by the DP guarantee)"

# A round's client ids and its number -> the process's client input.
ClientInputs = Callable[[Sequence[str], int], list]


@dataclasses.dataclass
class Training:
    """A built training process, the function that turns a round's client ids into its input, and
    `begin_round`, which keys the process's own randomness by round (secure aggregation's simulated
    dropouts) so that a round played again draws the same."""

    process: Any  # a tff.learning.templates.LearningProcess, or one with its interface
    client_inputs: ClientInputs
    begin_round: Callable[[int], None] = lambda round_num: None

    def prefetch(self, client_ids: Sequence[str], round_num: int) -> None:
        """Prepares a coming round's client inputs while the current round trains, when the client input can
        (`PreparedClients.prefetch`); otherwise nothing."""
        if prefetch := getattr(self.client_inputs, "prefetch", None):
            prefetch(client_ids, round_num)

    def close(self) -> None:
        """Stops a prefetch still running."""
        if wait := getattr(self.client_inputs, "wait_for_prefetch", None):
            wait(cancel=True)


class AggregationMode:
    """One way of combining client updates. Subclasses set `name` and, when they have settings, `section`
    and `Settings` (a dataclass of `fedmnist.schema.setting` fields: the config's `<section>:`)."""

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    Settings: ClassVar[type | None] = None
    weighted: ClassVar[bool] = True   # the mean is weighted by each client's examples
    private: ClassVar[bool] = False   # the model updates carry a differential-privacy guarantee

    def __init__(self, config: Config):
        self.config = config
        self.rows: list[dict] = []
        self.num_params = 0
        self.ledger: ReleaseLedger | None = None

    def keep_releases(self, ledger: ReleaseLedger) -> None:
        """Where the run counts noised releases (private modes count each before computing it)."""
        self.ledger = ledger

    @classmethod
    def check(cls, config: Config) -> None:
        """ConfigError for settings this mode cannot run with (no TensorFlow here)."""

    def secret_sample_rate(self, num_clients: int) -> float | None:
        """The rate of a secret Poisson sample of clients, when the mode needs one (else None)."""
        return None

    def build(self, builder: ProcessBuilder) -> Training:
        """The training process for this mode, from the configured algorithm on the configured client input."""
        self.num_params = builder.num_params
        return self.build_training(builder)

    def build_training(self, builder: ProcessBuilder) -> Training:
        raise NotImplementedError

    @property
    def float_bytes(self) -> int:
        """What one client uploads as TFF's float32 mean: every weight, and its example weight when weighted."""
        return 4 * (self.num_params + self.weighted)

    def header(self) -> str | None:
        """One line (or a few) for the start of the run."""
        return None

    def round(self, round_num: int, metrics: Mapping) -> dict:
        """The round's aggregation figures, from the process's metrics; kept for the summary."""
        row = {"mode": self.name, **self.figures(round_num, metrics)}
        self.rows.append(row)
        return row

    def figures(self, round_num: int, metrics: Mapping) -> dict:
        return {"upload_bytes_per_client": self.float_bytes}

    # Whether a round's duration may be released (metrics.jsonl, TensorBoard): not when it would tell how
    # many clients a secret sample held.
    round_time_public: ClassVar[bool] = True

    def released_train(self, train: dict) -> dict:
        """What of a round's local-training metrics may leave the server (metrics.jsonl, TensorBoard, the
        console): all of them, unless the mode's guarantee rests on something they would reveal."""
        return train

    def resume(self, rows: list[dict]) -> None:
        """The aggregation figures of the rounds a resumed run has already logged, so that the summary
        covers every round, not only this process's."""
        self.rows = [dict(row) for row in rows]

    def line(self, round_num: int, row: Mapping) -> str | None:
        """The console line for a round, when there is news."""
        return None

    @property
    def not_covered(self) -> str:
        """A note for figures computed on clients' data, which a privacy guarantee does not cover."""
        return NOT_COVERED if self.private else ""

    def summary(self) -> dict:
        """The mode's part of summary.json."""
        summary: dict = {"mode": self.name}
        uploads = [r["upload_bytes_per_client"] for r in self.rows if not math.isnan(r["upload_bytes_per_client"])]
        if uploads:  # none when every round was skipped
            summary["upload_bytes_per_client"] = sum(uploads) / len(uploads)
        return summary
