"""`aggregation: secure`: FedAvg whose server sees only masked updates (Bonawitz et al.'s protocol,
fedmnist/privacy/secagg.py, run around TFF's FedAvg in fedmnist/privacy/secure_process.py).

`Masked` holds what `secure` and `secure_dp` share: the protocol's roster (`secure.threshold`, dropouts),
its per-round figures and console line, and its part of the summary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional, TYPE_CHECKING

from fedmnist.aggregation.base import AggregationMode, Training
from fedmnist.errors import ConfigError
from fedmnist.privacy import secagg
from fedmnist.schema import setting
from fedmnist.values import to_python

if TYPE_CHECKING:
    from fedmnist.process import ProcessBuilder


@dataclasses.dataclass
class SecureConfig:
    """`secure:` settings: Bonawitz et al.'s pairwise masking."""
    dropout: float = setting(0.0, minimum=0, below=1)       # chance a client drops before sending its input
    dropout_after_input: float = setting(0.0, minimum=0, below=1)  # ... after sending it, before unmasking
    threshold: Optional[int] = setting(None, minimum=1)      # Shamir threshold t (>= 2); null = majority
    bits: int = setting(32, minimum=8, maximum=64)           # inputs are integers modulo 2^bits
    clip: float = setting(2.0, above=0)                      # L2 bound on each client's update
    # Bound on a client's weight (examples x epochs), which sizes the fixed-point range: null = the
    # largest client of the population; a client above an explicit bound is refused, never capped.
    max_client_weight: Optional[int] = setting(None, minimum=1)


def secure_threshold(config) -> int:
    """The Shamir threshold: as configured, else a majority of the clients in a round."""
    return config.secure.threshold or config.clients_per_round // 2 + 1


class Masked(AggregationMode):
    """A mode that sums the clients' encoded updates with the protocol: the roster's rules and reports."""

    section, Settings = "secure", SecureConfig

    @classmethod
    def check(cls, config) -> None:
        """Clients per round and threshold that the protocol can run with."""
        secure = config.secure
        if config.clients_per_round < 2:
            raise ConfigError(f"clients_per_round: aggregation: {config.aggregation} needs at least 2 clients "
                              f"per round; with {config.clients_per_round} the unmasked sum is that client's own "
                              f"update")
        if secure_threshold(config) < 2:
            raise ConfigError(f"secure.threshold: {secure.threshold} is too low: with a threshold of 1 every "
                              f"Shamir share is the secret itself; use at least 2 (null = a majority of "
                              f"clients_per_round)")
        if secure_threshold(config) > config.clients_per_round:
            raise ConfigError(f"secure.threshold: {secure.threshold} is more than the "
                              f"{config.clients_per_round} clients per round")
        if 2 * secure_threshold(config) <= config.clients_per_round:
            # Two disjoint groups of t clients then exist: a server that tells one "u survived" and the other
            # "u dropped" gets both of u's secrets and unmasks u's input alone (tests/test_secure_aggregation.py).
            raise ConfigError(f"secure.threshold: {secure.threshold} is at most half of the {config.clients_per_round} "
                              f"clients per round, which lets the server unmask one client's update; use more than "
                              f"{config.clients_per_round // 2} (null = a majority)")

    @property
    def threshold(self) -> int:
        return secure_threshold(self.config)

    def roster(self) -> str:
        secure = self.config.secure
        return (f"threshold {self.threshold} of {self.config.clients_per_round}, dropout {secure.dropout:g} "
                f"(after input {secure.dropout_after_input:g})")

    def figures(self, round_num: int, metrics: Mapping) -> dict:
        row = to_python(metrics["aggregator"]["secure"])
        row["upload_bytes_per_client"] = row.get("bytes_per_client", float("nan"))
        return row

    def spent(self, round_num: int, row: Mapping) -> str:
        """What the round's line says of the privacy spent (nothing without a DP guarantee)."""
        return ""

    def line(self, round_num: int, row: Mapping) -> str:
        if row["failed"]:
            return f"round {round_num:2d}, {row['error']}{self.spent(round_num, row)}"
        return (f"round {round_num:2d}, secure sum of {row['clients'] - row['dropped']} of {row['clients']} "
                f"clients ({row['dropped']} dropped), {row['bytes_per_client']:,.0f} bytes sent per client "
                f"({row['extra_bytes_per_client']:+,.0f} over float32){self.spent(round_num, row)}")

    def summary(self) -> dict:
        return super().summary() | {"failed_rounds": sum(r["failed"] for r in self.rows),
                                    "dropped_clients": sum(r["dropped"] for r in self.rows),
                                    "threshold": self.threshold}


class Secure(Masked):
    name = "secure"

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        secure = config.secure
        # Without an explicit bound the weights are known only once the data is loaded
        # (`secure_weight_bound`); weight 1 is the most room they can leave.
        if secure.max_client_weight:
            check_secure_precision(secure, config.clients_per_round, secure.max_client_weight,
                                   "raise secure.bits or lower secure.max_client_weight")
        else:
            check_secure_precision(secure, config.clients_per_round, 1, "raise secure.bits", " (the smallest possible)")

    def build_training(self, builder: ProcessBuilder) -> Training:
        from fedmnist.privacy.secure_process import SecureFedAvg

        bound = secure_weight_bound(self.config.secure, self.config.clients_per_round,
                                    builder.largest_client_weight())
        process = SecureFedAvg(builder, self.config.secure, self.threshold, self.config.clients_per_round,
                               bound, self.config.seed)
        return Training(process, builder.client_inputs(), process.begin_round)

    def header(self) -> str:
        secure = self.config.secure
        line = f"secure aggregation: {self.roster()}, {secure.bits}-bit inputs, clip {secure.clip:g}"
        return line


def check_secure_precision(secure: SecureConfig, clients_per_round: int, max_weight: int, fix: str,
                           detail: str = "") -> None:
    """ConfigError when `clients_per_round` weights up to `max_weight` leave less than
    MIN_PRECISION_BITS of resolution at the clipping bound (or could wrap the sum)."""
    scale = secagg.fixed_point_scale(secure.bits, secure.clip, max_weight, clients_per_round)
    if secagg.precision_bits(secure.clip, scale) < secagg.MIN_PRECISION_BITS:
        raise ConfigError(f"secure.bits: {secure.bits} bits leave too little precision for "
                          f"{clients_per_round} clients with weights up to {max_weight}{detail} and clip "
                          f"{secure.clip:g}; {fix}")


def secure_weight_bound(secure: SecureConfig, clients_per_round: int, largest_weight: int) -> int:
    """The bound on a client's weight that sizes the fixed-point range: `secure.max_client_weight`,
    else `largest_weight`, the population's largest client weight (examples x epochs). A client
    above an explicit bound is a ConfigError: capping its weight would silently change the mean."""
    bound = secure.max_client_weight or max(largest_weight, 1)
    if largest_weight > bound:
        raise ConfigError(f"secure.max_client_weight: a client has weight {largest_weight} (examples x "
                          f"preprocess.epochs), more than {bound}; raise it, or set it to null to use the "
                          f"largest client's weight")
    if secure.max_client_weight:
        check_secure_precision(secure, clients_per_round, bound, "raise secure.bits or lower secure.max_client_weight")
    else:
        check_secure_precision(secure, clients_per_round, bound, "raise secure.bits or lower preprocess.epochs or "
                               "data.max_examples_per_client", " (the largest client's examples x epochs)")
    return bound
