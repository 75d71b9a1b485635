"""`aggregation: dp`: user-level differential privacy with `tff.learning.dp_aggregator` (adaptive
clipping, Gaussian noise) and an unweighted mean; the privacy spent is accounted with `dp_accounting`
for the sampling that ran (fedmnist/privacy/accounting.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional, TYPE_CHECKING

from fedmnist.aggregation.base import COVERS, AggregationMode, Training
from fedmnist.errors import ConfigError
from fedmnist.schema import setting

if TYPE_CHECKING:
    from fedmnist.process import ProcessBuilder


@dataclasses.dataclass
class DPConfig:
    """`dp:` settings."""
    noise_multiplier: float = setting(0.5, minimum=0)        # must stay below 0.1 x clients_per_round
    delta: Optional[float] = setting(None, above=0, below=1)  # null = 0.01 / num_clients
    # false: secret Poisson sampling (q = clients_per_round / num_clients), no client ids logged;
    # true: the seeded sample with ids logged, accounted with q = 1 (a public sample amplifies nothing)
    public_sample: bool = False


def replayed(round_num: int, row: Mapping) -> str:
    """A note when more noised releases than rounds were made (rounds played again after a resume or a
    worker restart): epsilon counts them all."""
    extra = row["releases"] - round_num
    return f"; {row['releases']} releases, {extra} of them rounds played again" if extra > 0 else ""


# Train metrics that count the round's participants' data.
SAMPLE_SIZE_METRICS = ("num_examples", "num_batches")


class CentralDp(AggregationMode):
    name = "dp"
    section, Settings = "dp", DPConfig
    weighted = False
    private = True

    @classmethod
    def check(cls, config) -> None:
        if config.client_selection == "fixed":
            raise ConfigError("aggregation: dp needs client_selection: uniform; with a fixed list of clients "
                              "there is no sampling to account the privacy spent for")
        if config.availability.model != "always":
            raise ConfigError(f"aggregation: dp needs availability.model: always; with "
                              f"{config.availability.model!r} availability a client's chance of taking part "
                              f"differs from the rate the privacy accountant uses")
        if config.dp.noise_multiplier >= 0.1 * config.clients_per_round:
            # dp_aggregator spends part of the budget on clip-norm estimation, with noise of standard
            # deviation 0.05 x clients_per_round; the rest must still reach the requested multiplier.
            raise ConfigError(f"dp.noise_multiplier: with {config.clients_per_round} clients per round "
                              f"tff.learning.dp_aggregator needs a noise multiplier below "
                              f"{0.1 * config.clients_per_round:g}; lower it or raise clients_per_round")

    def secret_sample_rate(self, num_clients: int) -> float | None:
        if self.config.dp.public_sample:
            return None
        return min(1.0, self.config.clients_per_round / num_clients)

    def released_train(self, train: dict) -> dict:
        """With the secret sample, no figure that counts the round's sample: amplification by sampling
        assumes nobody learns who, or how many, took part. The example and batch counts go (and the round's
        duration, `round_time_public`); the run's totals are kept."""
        if self.config.dp.public_sample:
            return train
        return {key: value for key, value in train.items() if key not in SAMPLE_SIZE_METRICS}

    @property
    def round_time_public(self) -> bool:
        return self.config.dp.public_sample

    def build_training(self, builder: ProcessBuilder) -> Training:
        import tensorflow_federated as tff

        from fedmnist.privacy.accounting import delta_warning, dp_delta, sampling_for

        self.delta = dp_delta(self.config.dp, builder.num_clients)
        self.sampling = sampling_for(self.config, builder.num_clients)
        self.delta_warning = delta_warning(self.delta, builder.num_clients)
        # No zeroing: its norm estimate is not private and would spend budget nobody accounts for.
        aggregator = tff.learning.dp_aggregator(self.config.dp.noise_multiplier, self.config.clients_per_round,
                                                zeroing=False)
        # TFF adds the noise inside `next`: the release is counted before every call (`begin_round`).
        return Training(builder.learning_process(aggregator, weighted=False), builder.client_inputs(),
                        begin_round=self.ledger.record)

    def releases(self) -> int:
        return self.ledger.count()

    def epsilon(self, rounds: int) -> float:
        """The privacy spent by `rounds` noised releases (rounds played again included)."""
        from fedmnist.privacy.accounting import dp_epsilon

        return dp_epsilon(self.config.dp.noise_multiplier, self.sampling, rounds, self.delta)

    def header(self) -> str:
        line = (f"differential privacy (central: the server sees the clipped sum before adding noise): noise "
                f"multiplier {self.config.dp.noise_multiplier:g}, {self.sampling.describe()}, delta {self.delta:.3g}")
        return line + (f"\n{self.delta_warning}" if self.delta_warning else "")

    def figures(self, round_num: int, metrics: Mapping) -> dict:
        from fedmnist.values import to_python

        return {"epsilon": self.epsilon(self.releases()), "releases": self.releases(), "delta": self.delta,
                "sampling": self.sampling.kind,
                "sampling_rate": self.sampling.rate, "upload_bytes_per_client": self.float_bytes,
                "clip": to_python(metrics["aggregator"]["dp_query_metrics"]["clip"])}

    def line(self, round_num: int, row: Mapping) -> str:
        return (f"round {round_num:2d}, privacy spent: epsilon {row['epsilon']:.3f} at delta {row['delta']:.3g} "
                f"({self.sampling.describe()}; adaptive clip norm {row['clip']:.3g}){replayed(round_num, row)}")

    def summary(self) -> dict:
        return super().summary() | {
            "epsilon": self.epsilon(self.releases()), "releases": self.releases(), "delta": self.delta,
            "noise_multiplier": self.config.dp.noise_multiplier, "sampling": self.sampling.kind,
            "sampling_rate": self.sampling.rate, "covers": COVERS}
