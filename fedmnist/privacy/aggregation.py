"""How the server combines client updates (`aggregation` in the config), and what each way costs.

- `plain`: TFF's example-weighted mean, `build_weighted_fed_avg` as in the article.
- `secure`: the same FedAvg, but the server sees only masked updates (fedmnist/privacy/secure_process.py).
- `dp`: user-level differential privacy, `tff.learning.dp_aggregator` (adaptive clipping, Gaussian
  noise) with `build_unweighted_fed_avg`; the privacy spent is accounted with `dp_accounting`.
- `secure_dp`: distributed DP: each client adds a noise share to its quantized update and the server
  unmasks only the noised sum (fedmnist/privacy/distributed_dp.py, distributed_accounting.py).
- `compressed`: uniform quantization of the update, as `tff.learning.compression_aggregator`.

Each round reports `upload_bytes_per_client`: what one client sends for its update. plain and dp send
float32 (4 bytes per weight; plain adds the 4-byte example weight); secure and secure_dp send every message of the
protocol (keys, encrypted shares, the masked vector, unmasking shares), counted from the messages
themselves; compressed sends what TFF's encoder produces, measured by running that encoder on a
tensor of each shape. The small scalars that adaptive clipping and zeroing add are not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import tensorflow_federated as tff

from fedmnist import config as config_lib
from fedmnist.config import DP_MODES
from fedmnist.client_tensors import ClientInputs, articles_inputs, build_training
from fedmnist.outputs.records import to_python
from fedmnist.privacy.accounting import delta_warning, dp_delta, dp_epsilon, sampling_for
from fedmnist.privacy.compression import FLOAT_BITS, compression_aggregator, encoded_bits, quiet_bitpacking
from fedmnist.privacy.distributed_accounting import ddp_epsilon
from fedmnist.privacy.distributed_dp import ddp_parameters
from fedmnist.privacy.secagg import threshold_warning
from fedmnist.privacy.secure_process import SecureDpFedAvg, SecureFedAvg, largest_client_weight
from fedmnist.model import update_shapes
from fedmnist.process import build_optimizer


COVERS = ("the model updates only: the train metrics, participation and federated evaluation, computed on "
          "clients' data, are not covered by the guarantee")
# The server runs the protocol with the round's participants, so the sample amplifies nothing.
SECURE_DP_SAMPLING = "known to the server: no amplification (q = 1)"


class AggregationReport:
    """What the run logs about aggregation: per round (metrics.jsonl, TensorBoard) and in summary.json."""

    def __init__(self, config: config_lib.Config, shapes: list[tuple[int, ...]], num_clients: int):
        self.config, self.mode = config, config.aggregation
        self.num_params = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        self.float_bytes = 4 * (self.num_params + (self.mode not in DP_MODES))  # dp's mean is unweighted
        self.rows: list[dict] = []
        if self.mode == "dp":
            self.delta = dp_delta(config.dp, num_clients)
            self.sampling = sampling_for(config, num_clients)
            self.delta_warning = delta_warning(self.delta, num_clients)
        if self.mode == "secure_dp":
            self.delta = dp_delta(config.secure_dp, num_clients)
            self.delta_warning = delta_warning(self.delta, num_clients, "secure_dp.delta")
            self.ddp = ddp_parameters(config.secure_dp, config.clients_per_round,
                                      config_lib.secure_threshold(config), self.num_params)
        if self.mode == "compressed":
            settings = config.compression
            self.quantized = sum(int(np.prod(s)) > settings.threshold for s in shapes)
            self.upload_bits = sum(encoded_bits(s, settings.bits, settings.threshold) for s in shapes) + FLOAT_BITS

    def header(self) -> str | None:
        """One line for the start of the run."""
        if self.mode == "compressed":
            settings = self.config.compression
            line = (f"compression: {self.quantized} of the update's tensors quantized to {settings.bits} bits, "
                    f"{self.upload_bits / 8:,.0f} bytes per client per round instead of {self.float_bytes:,}")
            if not self.quantized:
                line += f" (no tensor has more than compression.threshold={settings.threshold} elements)"
            return line
        if self.mode == "dp":
            line = (f"differential privacy (central: the server sees the clipped sum before adding noise): noise "
                    f"multiplier {self.config.dp.noise_multiplier:g}, {self.sampling.describe()}, delta {self.delta:.3g}")
            return line + (f"\n{self.delta_warning}" if self.delta_warning else "")
        if self.mode == "secure":
            secure, threshold = self.config.secure, config_lib.secure_threshold(self.config)
            line = (f"secure aggregation: threshold {threshold} of "
                    f"{self.config.clients_per_round}, {secure.bits}-bit inputs, clip {secure.clip:g}, "
                    f"dropout {secure.dropout:g} (after input {secure.dropout_after_input:g})")
            warning = threshold_warning(threshold, self.config.clients_per_round)
            return line + (f"\n{warning}" if warning else "")
        if self.mode == "secure_dp":
            return self._secure_dp_header()
        return None

    def _secure_dp_header(self) -> str:
        p, secure = self.ddp, self.config.secure
        lines = [f"distributed differential privacy under secure aggregation (of the model updates, the server sees "
                 f"masked inputs and their noised sum only): {p.mechanism}, noise multiplier {p.noise_multiplier:g}, clip {p.clip:g}, "
                 f"local noise stddev {p.local_stddev:.3g} per client (any {p.threshold} survivors add the "
                 f"central noise), {p.bits}-bit sum, scale {p.scale:.4g}, {p.padded_dim} rotated coordinates, "
                 f"threshold {p.threshold} of {p.clients_per_round}, dropout {secure.dropout:g} (after input "
                 f"{secure.dropout_after_input:g}), {SECURE_DP_SAMPLING}, delta {self.delta:.3g}"]
        lines += [w for w in (threshold_warning(p.threshold, p.clients_per_round), self.delta_warning) if w]
        return "\n".join(lines)

    def round(self, round_num: int, metrics: Mapping) -> dict:
        """The round's aggregation figures, from the process's metrics."""
        row: dict = {"mode": self.mode}
        if self.mode in ("secure", "secure_dp"):
            row.update(to_python(metrics["aggregator"]["secure"]))
            row["upload_bytes_per_client"] = row.get("bytes_per_client", math.nan)
            if self.mode == "secure_dp":
                row.update(epsilon=self.epsilon(round_num), delta=self.delta, sampling=SECURE_DP_SAMPLING)
        elif self.mode == "dp":
            row.update(epsilon=self.epsilon(round_num), delta=self.delta, sampling=self.sampling.kind,
                       sampling_rate=self.sampling.rate, upload_bytes_per_client=self.float_bytes,
                       clip=to_python(metrics["aggregator"]["dp_query_metrics"]["clip"]))
        elif self.mode == "compressed":
            row.update(upload_bits_per_client=self.upload_bits,
                       uncompressed_bits_per_client=8 * self.float_bytes,
                       upload_bytes_per_client=self.upload_bits / 8)
        else:
            row["upload_bytes_per_client"] = self.float_bytes
        self.rows.append(row)
        return row

    def line(self, round_num: int, row: Mapping) -> str | None:
        """The console line for a round, when there is news."""
        if self.mode in ("secure", "secure_dp"):
            spent = (f"; privacy spent: epsilon {row['epsilon']:.3f} at delta {row['delta']:.3g}"
                     if self.mode == "secure_dp" else "")
            if row["failed"]:
                return f"round {round_num:2d}, {row['error']}{spent}"
            return (f"round {round_num:2d}, secure sum of {row['clients'] - row['dropped']} of {row['clients']} "
                    f"clients ({row['dropped']} dropped), {row['bytes_per_client']:,.0f} bytes sent per client "
                    f"({row['extra_bytes_per_client']:+,.0f} over float32){spent}")
        if self.mode == "dp":
            return (f"round {round_num:2d}, privacy spent: epsilon {row['epsilon']:.3f} at delta {row['delta']:.3g} "
                    f"({self.sampling.describe()}; adaptive clip norm {row['clip']:.3g})")
        return None

    def epsilon(self, rounds: int) -> float:
        """dp, secure_dp: the privacy spent by `rounds` rounds (skipped ones included, conservatively)."""
        if self.mode == "secure_dp":
            return ddp_epsilon(self.ddp, rounds, self.delta)
        return dp_epsilon(self.config.dp.noise_multiplier, self.sampling, rounds, self.delta)

    @property
    def not_covered(self) -> str:
        """dp, secure_dp: a note for what the guarantee does not cover (metrics computed on clients' data)."""
        return " (not covered by the DP guarantee)" if self.mode in DP_MODES else ""

    def summary(self) -> dict:
        summary: dict = {"mode": self.mode}
        uploads = [r["upload_bytes_per_client"] for r in self.rows if not np.isnan(r["upload_bytes_per_client"])]
        if uploads:  # none when every round was skipped
            summary["upload_bytes_per_client"] = float(np.mean(uploads))
        if self.mode in ("secure", "secure_dp"):
            summary.update(failed_rounds=sum(r["failed"] for r in self.rows),
                           dropped_clients=sum(r["dropped"] for r in self.rows),
                           threshold=config_lib.secure_threshold(self.config))
        if self.mode == "dp":
            summary.update(epsilon=self.epsilon(self.config.rounds), delta=self.delta,
                           noise_multiplier=self.config.dp.noise_multiplier, sampling=self.sampling.kind,
                           sampling_rate=self.sampling.rate, covers=COVERS)
        if self.mode == "secure_dp":
            summary.update(self.ddp.summary())
            summary.update(epsilon=self.epsilon(self.config.rounds), delta=self.delta, sampling=SECURE_DP_SAMPLING,
                           sampling_rate=1.0, covers=COVERS)
        if self.mode == "compressed":
            summary.update(upload_bits_per_client=self.upload_bits,
                           uncompressed_bits_per_client=8 * self.float_bytes)
        return summary


class RoundKeyed(Protocol):
    """A process whose randomness is keyed by the round (secure aggregation's simulated dropouts), so a
    resumed run repeats it."""

    def begin_round(self, round_num: int) -> None: ...


@dataclasses.dataclass
class Training:
    """The training process for a config, the report that goes with it, and the function that turns a
    round's client ids into the process's input."""

    process: tff.learning.templates.LearningProcess | SecureFedAvg | SecureDpFedAvg
    report: AggregationReport
    client_inputs: ClientInputs
    keyed: RoundKeyed | None = None

    def begin_round(self, round_num: int) -> None:
        if self.keyed is not None:
            self.keyed.begin_round(round_num)


def build_process(config: config_lib.Config, model_fn: Callable[[], tff.learning.models.VariableModel],
                  client_data: tff.simulation.datasets.ClientData, preprocess_kwargs: dict) -> Training:
    """The training for `config.aggregation`: prepared client tensors for `plain` (fedmnist/client_tensors.py,
    unless `client_input: datasets`), the article's pipelines (`articles_inputs`) otherwise."""
    mode = config.aggregation
    report = AggregationReport(config, update_shapes(model_fn), len(client_data.client_ids))
    articles = articles_inputs(config, client_data, preprocess_kwargs)
    if mode == "plain":
        process, client_inputs = build_training(config, model_fn, client_data, preprocess_kwargs)
        return Training(process, report, client_inputs)
    if mode == "secure":
        process = SecureFedAvg(model_fn, config.client_optimizer, config.server_optimizer, config.secure,
                               config_lib.secure_threshold(config), config.clients_per_round, config.seed,
                               largest_client_weight=largest_client_weight(client_data, preprocess_kwargs["epochs"]))
        return Training(process, report, articles, keyed=process)
    if mode == "secure_dp":
        process = SecureDpFedAvg(model_fn, config.client_optimizer, config.server_optimizer, config.secure,
                                 report.ddp, config.seed)
        return Training(process, report, articles, keyed=process)
    if mode == "dp":
        # No zeroing: its norm estimate is not private and would spend budget nobody accounts for.
        aggregator = tff.learning.dp_aggregator(config.dp.noise_multiplier, config.clients_per_round,
                                                zeroing=False)
        process = tff.learning.algorithms.build_unweighted_fed_avg(
            model_fn, build_optimizer(config.client_optimizer), build_optimizer(config.server_optimizer),
            model_aggregator=aggregator)
        return Training(process, report, articles)
    if mode == "compressed":
        aggregator = compression_aggregator(config.compression.bits, config.compression.threshold)
        with quiet_bitpacking():
            process = tff.learning.algorithms.build_weighted_fed_avg(
                model_fn, build_optimizer(config.client_optimizer), build_optimizer(config.server_optimizer),
                model_aggregator=aggregator)
        return Training(process, report, articles)
    raise ValueError(f"unknown aggregation {mode!r}")
