"""How the server combines client updates (`aggregation` in the config), and what each way costs.

- `plain`: TFF's example-weighted mean, `build_weighted_fed_avg` as in the article.
- `secure`: the same FedAvg, but the server sees only masked updates (fedmnist/secure_process.py).
- `dp`: user-level differential privacy, `tff.learning.dp_aggregator` (adaptive clipping, Gaussian
  noise) with `build_unweighted_fed_avg`; the privacy spent is accounted with `dp_accounting`.
- `compressed`: uniform quantization of the update, as `tff.learning.compression_aggregator`.

Each round reports `upload_bytes_per_client`: what one client sends for its update. plain and dp send
float32 (4 bytes per weight; plain adds the 4-byte example weight); secure sends every message of the
protocol (keys, encrypted shares, the masked vector, unmasking shares), counted from the messages
themselves; compressed sends what TFF's encoder produces, measured by running that encoder on a
tensor of each shape. The small scalars that adaptive clipping and zeroing add are not counted.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import config as config_lib
from fedmnist.logs import to_python
from fedmnist.data import make_federated_data
from fedmnist.prepared import build_training
from fedmnist.process import build_optimizer
from fedmnist.secure_process import SecureFedAvg

FLOAT_BITS = 32


def update_shapes(model_fn: Callable[[], tff.learning.models.VariableModel]) -> list[tuple[int, ...]]:
    """Shapes of the trainable weights, i.e. of a client's model update."""
    trainable = tff.learning.models.weights_type_from_model(model_fn).trainable
    return [tuple(int(d) for d in tensor.shape) for tensor in trainable]


# --- Differential privacy ----------------------------------------------------------------------

def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` of the Gaussian mechanism on a `sampling_rate` sample of clients.

    Uniform sampling of K of N clients is accounted as Poisson sampling with q = K / N (as TFF's
    DP tutorial does), with the RDP accountant of `dp_accounting`.
    """
    import dp_accounting

    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds)
    return float(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def dp_delta(settings: config_lib.DPConfig, num_clients: int) -> float:
    return settings.delta if settings.delta is not None else 1.0 / num_clients ** 1.1


# --- Compression -------------------------------------------------------------------------------

def compression_aggregator(bits: int = 8, threshold: int = 20000) -> tff.aggregators.WeightedAggregationFactory:
    """`tff.learning.compression_aggregator()` with its quantization bits and size threshold as
    parameters (TFF fixes 8 and 20,000, which leaves the article's 7,840-weight kernel unquantized):
    adaptive zeroing, adaptive L2 clipping, weighted mean, uniform quantization of large tensors."""
    quantized_sum = tff.aggregators.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=bits, threshold=threshold)
    clipping_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2)
    zeroing_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=10.0, target_quantile=0.98, learning_rate=math.log(10.0), multiplier=2.0, increment=1.0)
    clipped = tff.aggregators.clipping_factory(clipping_norm, tff.aggregators.MeanFactory(quantized_sum))
    return tff.aggregators.zeroing_factory(zeroing_norm, clipped)


def encoded_bits(shape: tuple[int, ...], bits: int, threshold: int) -> int:
    """Bits of one tensor of `shape` as the compression aggregator's encoder sends it."""
    size = int(np.prod(shape, dtype=np.int64))
    if size <= threshold:
        return FLOAT_BITS * size
    from tensorflow_model_optimization.python.core.internal import tensor_encoding as te

    encoder = te.encoders.as_gather_encoder(te.encoders.uniform_quantization(bits),
                                            tf.TensorSpec(shape, tf.float32))
    encode_params, _, _ = encoder.get_params(encoder.initial_state())
    with _quiet_bitpacking():
        encoded, _ = encoder.encode(tf.zeros(shape), encode_params)
    return sum(int(np.prod(t.shape)) * t.dtype.size * 8 for t in tf.nest.flatten(encoded))


@contextlib.contextmanager
def _quiet_bitpacking() -> Iterator[None]:
    """The bitpacking stage logs a memory warning on the root logger each time it is traced."""
    quiet = lambda record: "bitpacking" not in record.getMessage()  # noqa: E731
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


# --- The process and its report ----------------------------------------------------------------

class AggregationReport:
    """What the run logs about aggregation: per round (metrics.jsonl, TensorBoard) and in summary.json."""

    def __init__(self, config: config_lib.Config, shapes: list[tuple[int, ...]], num_clients: int):
        self.config, self.mode = config, config.aggregation
        self.num_params = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
        self.float_bytes = 4 * (self.num_params + (self.mode != "dp"))  # dp's mean is unweighted
        self.rows: list[dict] = []
        if self.mode == "dp":
            self.delta = dp_delta(config.dp, num_clients)
            self.sampling_rate = config.clients_per_round / num_clients
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
            return (f"differential privacy: noise multiplier {self.config.dp.noise_multiplier:g}, "
                    f"sampling rate {self.sampling_rate:.3g}, delta {self.delta:.3g}")
        if self.mode == "secure":
            secure = self.config.secure
            return (f"secure aggregation: threshold {config_lib.secure_threshold(self.config)} of "
                    f"{self.config.clients_per_round}, {secure.bits}-bit inputs, clip {secure.clip:g}, "
                    f"dropout {secure.dropout:g}")
        return None

    def round(self, round_num: int, metrics: Mapping) -> dict:
        """The round's aggregation figures, from the process's metrics."""
        row: dict = {"mode": self.mode}
        if self.mode == "secure":
            row.update(to_python(metrics["aggregator"]["secure"]))
            row["upload_bytes_per_client"] = row.get("bytes_per_client", math.nan)
        elif self.mode == "dp":
            row.update(epsilon=dp_epsilon(self.config.dp.noise_multiplier, self.sampling_rate, round_num,
                                          self.delta),
                       delta=self.delta, upload_bytes_per_client=self.float_bytes,
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
        if self.mode == "secure":
            if row["failed"]:
                return f"round {round_num:2d}, {row['error']}"
            return (f"round {round_num:2d}, secure sum of {row['clients'] - row['dropped']} of {row['clients']} "
                    f"clients ({row['dropped']} dropped), {row['bytes_per_client']:,.0f} bytes sent per client "
                    f"({row['extra_bytes_per_client']:+,.0f} over float32)")
        if self.mode == "dp":
            return (f"round {round_num:2d}, privacy spent: epsilon {row['epsilon']:.3f} at delta {row['delta']:.3g} "
                    f"(adaptive clip norm {row['clip']:.3g})")
        return None

    def summary(self) -> dict:
        summary: dict = {"mode": self.mode}
        uploads = [r["upload_bytes_per_client"] for r in self.rows if not np.isnan(r["upload_bytes_per_client"])]
        if uploads:  # none when every round was skipped
            summary["upload_bytes_per_client"] = float(np.mean(uploads))
        if self.mode == "secure":
            summary.update(failed_rounds=sum(r["failed"] for r in self.rows),
                           dropped_clients=sum(r["dropped"] for r in self.rows),
                           threshold=config_lib.secure_threshold(self.config))
        if self.mode == "dp" and self.rows:
            summary.update(epsilon=self.rows[-1]["epsilon"], delta=self.delta,
                           noise_multiplier=self.config.dp.noise_multiplier, sampling_rate=self.sampling_rate)
        if self.mode == "compressed":
            summary.update(upload_bits_per_client=self.upload_bits,
                           uncompressed_bits_per_client=8 * self.float_bytes)
        return summary


def build_process(config: config_lib.Config, model_fn: Callable[[], tff.learning.models.VariableModel],
                  client_data: tff.simulation.datasets.ClientData, preprocess_kwargs: dict,
                  ) -> tuple[object, AggregationReport, Callable[[Sequence[str]], list]]:
    """The training process for `config.aggregation` (a LearningProcess, or SecureFedAvg with its
    surface), the report that goes with it, and the function that turns a round's client ids into the
    process's input: prepared client tensors for `plain` (fedmnist/prepared.py, unless
    `client_input: datasets`), the article's `make_federated_data` otherwise."""
    mode = config.aggregation
    num_clients = len(client_data.client_ids)
    report = AggregationReport(config, update_shapes(model_fn), num_clients)
    if mode == "plain":
        process, client_inputs = build_training(config, model_fn, client_data, preprocess_kwargs)
        return process, report, client_inputs
    if mode == "secure":
        process = SecureFedAvg(model_fn, config.client_optimizer, config.server_optimizer, config.secure,
                               config_lib.secure_threshold(config), config.clients_per_round, config.seed)
    elif mode == "dp":
        # No zeroing: its norm estimate is not private and would spend budget nobody accounts for.
        aggregator = tff.learning.dp_aggregator(config.dp.noise_multiplier, config.clients_per_round,
                                                zeroing=False)
        process = tff.learning.algorithms.build_unweighted_fed_avg(
            model_fn, build_optimizer(config.client_optimizer), build_optimizer(config.server_optimizer),
            model_aggregator=aggregator)
    elif mode == "compressed":
        aggregator = compression_aggregator(config.compression.bits, config.compression.threshold)
        with _quiet_bitpacking():
            process = tff.learning.algorithms.build_weighted_fed_avg(
                model_fn, build_optimizer(config.client_optimizer), build_optimizer(config.server_optimizer),
                model_aggregator=aggregator)
    else:
        raise ValueError(f"unknown aggregation {mode!r}")
    return process, report, lambda client_ids: make_federated_data(client_data, client_ids, **preprocess_kwargs)
