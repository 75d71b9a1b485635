"""`algorithm: fedprox`: Li et al. 2020's FedProx: federated averaging whose clients minimize their loss
plus the proximal term (mu / 2) ||w - w_global||^2, mu = `fedprox.proximal_strength`.

Its client work is fedmnist's prepared-tensor loop (fedmnist/client_tensors.py), which adds the term's
gradient mu (w - w_global) to each step's. TFF 0.87's `tff.learning.algorithms.build_weighted_fed_prox`
adds mu (w_global - w) instead (proximal_client_work.py: `delta_l2_regularizer * (y - x)` with x the
current and y the initial weights), which pushes each client away from the global model;
tests/test_fedprox.py shows both against FedProx computed by hand. So `client_input: datasets`, which
would use TFF's builder, is refused.
"""

from __future__ import annotations

import dataclasses

from fedmnist.algorithms.fedavg import FedAvg
from fedmnist.errors import ConfigError
from fedmnist.schema import setting


@dataclasses.dataclass
class FedProxConfig:
    """`fedprox:` settings."""
    proximal_strength: float = setting(0.01, minimum=0)   # mu; 0 is FedAvg


class FedProx(FedAvg):
    name = "fedprox"
    section, Settings = "fedprox", FedProxConfig

    @classmethod
    def check(cls, config) -> None:
        if config.client_input != "prepared":
            raise ConfigError("algorithm: fedprox needs client_input: prepared: TFF 0.87's build_weighted_fed_prox "
                              "adds the proximal gradient with the wrong sign (fedmnist/algorithms/fedprox.py)")

    @property
    def proximal_strength(self) -> float:
        return self.config.fedprox.proximal_strength

    def describe(self) -> str:
        return f"algorithm: FedProx, proximal strength mu = {self.proximal_strength:g}"

    def build(self, *args, **kwargs):
        raise ConfigError("algorithm: fedprox runs on client_input: prepared only")

    client_work = build
