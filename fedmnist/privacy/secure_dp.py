"""`aggregation: secure_dp`: distributed differential privacy: each client noises its quantized update
(fedmnist/privacy/distributed_dp.py) and the server unmasks only the noised sum, under the `secure:`
protocol (its threshold and dropouts; not its bits and clip). Accounted in distributed_accounting.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, Optional, TYPE_CHECKING

from fedmnist.aggregation.base import COVERS, Training
from fedmnist.errors import ConfigError
from fedmnist.privacy.central_dp import replayed
from fedmnist.privacy.secure import Masked
from fedmnist.schema import setting

if TYPE_CHECKING:
    from fedmnist.process import ProcessBuilder

# The server runs the protocol with the round's participants, so the sample amplifies nothing.
SECURE_DP_SAMPLING = "known to the server: no amplification (q = 1)"


@dataclasses.dataclass
class SecureDpConfig:
    """`secure_dp:` settings."""
    mechanism: Literal["distributed_skellam", "distributed_dgauss"] = "distributed_skellam"
    # Central noise stddev / clip: what any `secure.threshold` surviving clients' noise shares add up to
    # (0 = no noise). Must not exceed clients_per_round: the mean's noise would exceed a whole update.
    noise_multiplier: float = setting(0.5, minimum=0)
    clip: float = setting(0.3, above=0)                      # L2 bound on each client's update
    # The secure sum is modulo 2^bits. At most 32: values are handled in float64 and int64, and a larger
    # modulus would let the noise outgrow numpy's Poisson sampler.
    bits: int = setting(16, minimum=2, maximum=32)    # the protocol masks in at least 2 bits
    # The target probability that one coordinate of the sum wraps around (sizes the scale, as TFF's); with
    # thousands of coordinates some wrap in many rounds: each round reports `wrapped_coordinates`.
    modclip_prob: float = setting(1e-4, above=0, below=1)
    delta: Optional[float] = setting(None, above=0, below=1)  # null = 0.01 / num_clients


class SecureDp(Masked):
    name = "secure_dp"
    section, Settings = "secure_dp", SecureDpConfig
    weighted = False
    private = True

    @classmethod
    def check(cls, config) -> None:
        """The protocol's roster, a sum that cannot wrap (TFF's DistributedDpSumFactory conditions) and noise
        that still means something. The scale, which needs the model's size, is checked in `build`."""
        from fedmnist.privacy.distributed_dp import clip_prob_to_num_stddevs  # numpy and scipy, no TensorFlow

        super().check(config)
        ddp, clients = config.secure_dp, config.clients_per_round
        if 2 ** ddp.bits < clients:
            raise ConfigError(f"secure_dp.bits: 2^{ddp.bits} is less than the {clients} clients per round, so "
                              f"their sum wraps; raise secure_dp.bits")
        if 2 ** (2 * ddp.bits) < clients * clip_prob_to_num_stddevs(ddp.modclip_prob) ** 2:
            raise ConfigError(f"secure_dp.bits: {ddp.bits} bits are too few for {clients} clients at "
                              f"secure_dp.modclip_prob {ddp.modclip_prob:g}; raise secure_dp.bits or "
                              f"secure_dp.modclip_prob")
        if ddp.noise_multiplier > clients:
            raise ConfigError(f"secure_dp.noise_multiplier: {ddp.noise_multiplier:g} is more than the {clients} "
                              f"clients per round: the mean's noise per weight would exceed a whole clipped "
                              f"update; lower it")

    def build(self, builder: ProcessBuilder) -> Training:
        from fedmnist.privacy.accounting import delta_warning, dp_delta
        from fedmnist.privacy.distributed_dp import ddp_parameters

        self.delta = dp_delta(self.config.secure_dp, builder.num_clients)
        self.delta_warning = delta_warning(self.delta, builder.num_clients, "secure_dp.delta")
        self.ddp = ddp_parameters(self.config.secure_dp, self.config.clients_per_round, self.threshold,
                                  builder.num_params)
        return super().build(builder)

    def build_training(self, builder: ProcessBuilder) -> Training:
        from fedmnist.privacy.secure_process import SecureDpFedAvg

        process = SecureDpFedAvg(builder, self.config.secure, self.ddp, self.config.seed,
                                 before_unmask=self.ledger.record)
        return Training(process, builder.client_inputs(), process.begin_round)

    def releases(self) -> int:
        return self.ledger.count()

    def epsilon(self, rounds: int) -> float:
        """The privacy spent by `rounds` unmasked noised sums (rounds played again included)."""
        from fedmnist.privacy.distributed_accounting import ddp_epsilon

        return ddp_epsilon(self.ddp, rounds, self.delta)

    def header(self) -> str:
        p = self.ddp
        line = (f"distributed differential privacy under secure aggregation (of the model updates, the server sees "
                f"masked inputs and their noised sum only): {p.mechanism}, noise multiplier {p.noise_multiplier:g}, "
                f"clip {p.clip:g}, local noise stddev {p.local_stddev:.3g} per client (any {p.threshold} survivors "
                f"add the central noise), {p.bits}-bit sum, scale {p.scale:.4g}, {p.padded_dim} rotated coordinates, "
                f"{self.roster()}, {SECURE_DP_SAMPLING}, delta {self.delta:.3g}")
        return "\n".join([line, *([self.delta_warning] if self.delta_warning else [])])

    def figures(self, round_num: int, metrics: Mapping) -> dict:
        return super().figures(round_num, metrics) | {"epsilon": self.epsilon(self.releases()),
                                                      "releases": self.releases(), "delta": self.delta,
                                                      "sampling": SECURE_DP_SAMPLING}

    def spent(self, round_num: int, row: Mapping) -> str:
        return f"; privacy spent: epsilon {row['epsilon']:.3f} at delta {row['delta']:.3g}" + replayed(round_num, row)

    def summary(self) -> dict:
        return super().summary() | self.ddp.summary() | {
            "epsilon": self.epsilon(self.releases()), "releases": self.releases(), "delta": self.delta,
            "sampling": SECURE_DP_SAMPLING,
            "sampling_rate": 1.0, "covers": COVERS}
