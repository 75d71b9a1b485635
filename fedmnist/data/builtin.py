"""The data sources that ship with fedmnist, as registered in fedmnist/registry.py.

- `emnist`: the real federated EMNIST through `tff.simulation.datasets.emnist.load_data`.
- `digits`: scikit-learn's 1,797 real handwritten 8x8 digits, scaled to 28x28, split into clients.
- `synthetic`: small random, learnable data for fast tests.
- `mnist`: Keras's MNIST split into clients as McMahan et al. 2017 split it (fedmnist/data/mnist.py).
- `auto`: `emnist` when it is cached or can be downloaded, otherwise `digits` with one warning.

The loaders live in sources.py and mnist.py; they import TensorFlow, so they are imported on use.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from fedmnist.data.types import DataSource, FederatedDataset

if TYPE_CHECKING:
    from fedmnist.config import DataConfig


class Emnist(DataSource):
    @classmethod
    def load(cls, data: DataConfig, seed: int) -> FederatedDataset:
        from fedmnist.data.sources import load_emnist

        return load_emnist(data.only_digits, data.cache_dir, data.allow_download)


class Digits(DataSource):
    max_clients = 1797 // 2
    examples_note = "digits has 1,797 examples"

    @classmethod
    def load(cls, data: DataConfig, seed: int) -> FederatedDataset:
        from fedmnist.data.sources import load_digits

        return load_digits(data.num_clients, data.partition, seed, data.dirichlet_alpha, data.test_fraction)


class Synthetic(DataSource):
    max_clients = sys.maxsize

    @classmethod
    def check(cls, config) -> None:
        from fedmnist import machine
        from fedmnist.errors import PlanTooLargeError

        super().check(config)
        data = config.data
        # Generated in memory: float64 noise and pixels, then a float32 copy per client.
        needed, memory = 20 * 784 * data.num_clients * data.examples_per_client, machine.memory_bytes()
        if needed > memory:
            raise PlanTooLargeError(f"data.examples_per_client: {data.num_clients:,} clients x "
                                    f"{data.examples_per_client:,} synthetic examples need about "
                                    f"{machine.gigabytes(needed)} GB, more than this machine's "
                                    f"{machine.gigabytes(memory)} GB; lower it or data.num_clients")

    @classmethod
    def load(cls, data: DataConfig, seed: int) -> FederatedDataset:
        from fedmnist.data.sources import load_synthetic

        return load_synthetic(data.num_clients, data.examples_per_client, seed, data.partition,
                              data.dirichlet_alpha, data.test_fraction)


class Mnist(DataSource):
    max_clients = 10000 // 2
    examples_note = "MNIST's 10,000 test images are dealt to the clients too"

    @classmethod
    def load(cls, data: DataConfig, seed: int) -> FederatedDataset:
        from fedmnist.data.mnist import load_mnist

        return load_mnist(data.num_clients, data.partition, seed, data.dirichlet_alpha, data.cache_dir,
                          data.allow_download, data.mnist_pixels)


class Auto(DataSource):
    @classmethod
    def load(cls, data: DataConfig, seed: int) -> FederatedDataset:
        from fedmnist.data.sources import can_download, emnist_cache_dir, emnist_is_cached

        if emnist_is_cached(emnist_cache_dir(data.cache_dir)) or (data.allow_download and can_download()):
            return Emnist.load(data, seed)
        print("warning: federated EMNIST is not cached and there is no network; "
              "using scikit-learn's digits instead (--dataset digits)", file=sys.stderr)
        Digits.check_clients(data)  # `check` could not know that the digits would stand in
        return Digits.load(data, seed)
