"""The `scale` workload's population: synthetic clients sized like federated EMNIST's."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.data.sources import FederatedDataset, examples_dataset


def scale_population(num_clients: int = 3383, seed: int = 0) -> tuple[FederatedDataset, int]:
    """Synthetic clients whose sizes follow federated EMNIST's (mean ~101 train examples, long tail),
    and their total number of training examples.

    Each client's examples are generated from its index when its dataset is built, so the
    population itself takes no memory and the benchmark sees only the training path's.
    """
    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(mean=np.log(90), sigma=0.5, size=num_clients), 10, 460).astype(np.int64)
    prototypes = rng.uniform(0.0, 1.0, size=(10, 28, 28)).astype(np.float32)
    ids = [f"client_{i:04d}" for i in range(num_clients)]
    index = {cid: i for i, cid in enumerate(ids)}

    def client_fn(split: int) -> Callable[[str], tf.data.Dataset]:
        def dataset_fn(client_id: str) -> tf.data.Dataset:
            i = index[client_id]
            n = int(sizes[i]) if split == 0 else max(2, int(sizes[i]) // 8)
            client_rng = np.random.default_rng([seed, i, split])
            labels = client_rng.integers(0, 10, size=n).astype(np.int32)
            noise = client_rng.normal(0.0, 0.9, size=(n, 28, 28)).astype(np.float32)
            pixels = np.clip(prototypes[labels] + noise, 0.0, 1.0)
            return examples_dataset(OrderedDict(label=labels, pixels=pixels))
        return dataset_fn

    train = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(ids, client_fn(0))
    test = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(ids, client_fn(1))
    return FederatedDataset("synthetic-emnist-sized", train, test, 10), int(sizes.sum())
