"""What every data source yields, and the interface a source implements (no TensorFlow here)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import tensorflow_federated as tff

    from fedmnist.config import Config, DataConfig


@dataclasses.dataclass
class FederatedDataset:
    """A federated population: the same client ids in `train` and `test`."""

    name: str
    train: tff.simulation.datasets.ClientData
    test: tff.simulation.datasets.ClientData
    num_classes: int
    # The source's own pooled test set (pixels, labels), e.g. MNIST's 10,000 test images; without one,
    # centralized evaluation pools the clients' test data (`sources.pooled_test_set`).
    central_test: tuple[np.ndarray, np.ndarray] | None = None
    origin: str = "the generated data"  # where the examples come from, for error messages (a file, a source)
    partition: str | None = None  # how a pool of examples was dealt to the clients; None: the source's own clients


class DataSource:
    """One `data.dataset` choice, registered in fedmnist/registry.py: its limits on the config (`check`,
    no TensorFlow) and its loading (`load`, which may import TensorFlow)."""

    # The most clients the source's examples can be split into (None: the source's own clients).
    max_clients: ClassVar[int | None] = None
    examples_note: ClassVar[str] = ""

    @classmethod
    def check(cls, config: Config) -> None:
        from fedmnist.errors import ConfigError

        data = config.data
        if cls.max_clients is None:
            return
        if config.clients_per_round > data.num_clients:
            raise ConfigError(f"clients_per_round: {config.clients_per_round} is more than the "
                              f"{data.num_clients} clients of data.num_clients")
        cls.check_clients(data)

    @classmethod
    def check_clients(cls, data: DataConfig) -> None:
        """ConfigError when the source's examples cannot be split into `data.num_clients` clients."""
        from fedmnist.errors import ConfigError

        if cls.max_clients is not None and data.num_clients > cls.max_clients:
            raise ConfigError(f"data.num_clients: {cls.examples_note}, too few for {data.num_clients:,} clients "
                              f"(at most {cls.max_clients:,})")

    @classmethod
    def load(cls, data: DataConfig, seed: int) -> FederatedDataset:
        raise NotImplementedError
