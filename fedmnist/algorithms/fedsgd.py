"""`algorithm: fedsgd`: McMahan et al.'s FedSGD, federated averaging with one full-batch step per client and
round (E = 1, B = inf). The same as `algorithm: fedavg` with `preprocess.epochs: 1` and
`preprocess.batch_size: 0`, which keeps working as its alias."""

from __future__ import annotations

from fedmnist.algorithms.fedavg import FedAvg
from fedmnist.errors import ConfigError


class FedSgd(FedAvg):
    name = "fedsgd"
    defaults = {"preprocess.epochs": 1, "preprocess.batch_size": 0}

    @classmethod
    def check(cls, config) -> None:
        if config.preprocess.epochs != 1 or config.preprocess.batch_size != 0:
            raise ConfigError(f"algorithm: fedsgd takes one full-batch step per client (preprocess.epochs 1, "
                              f"preprocess.batch_size 0), not epochs {config.preprocess.epochs} and batch size "
                              f"{config.preprocess.batch_size}; use algorithm: fedavg for local epochs")

    def describe(self) -> str:
        return "algorithm: FedSGD (one full-batch gradient step per client per round)"
