"""Step 1 of the article: its preprocessing, exactly as the tutorial writes it.

`preprocess` turns one client's EMNIST-like examples (`label`, `pixels` 28x28) into the batches the
model trains on; `make_federated_data` does it for a list of clients, as the article's round loop does.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

# The tutorial's settings.
NUM_CLIENTS = 10
NUM_EPOCHS = 5
BATCH_SIZE = 20
SHUFFLE_BUFFER = 100
PREFETCH_BUFFER = 10
SHUFFLE_SEED = 1

IMAGE_SHAPE = (28, 28)


def batch_format_fn(element):
    """Flattens a batch of 28x28 images to 784 features and gives labels shape [-1, 1]."""
    return collections.OrderedDict(
        x=tf.reshape(element["pixels"], [-1, 784]),
        y=tf.reshape(element["label"], [-1, 1]))


def preprocess(dataset: tf.data.Dataset, epochs: int = NUM_EPOCHS, batch_size: int = BATCH_SIZE,
               shuffle_buffer: int = SHUFFLE_BUFFER, prefetch_buffer: int = PREFETCH_BUFFER,
               seed: int = SHUFFLE_SEED) -> tf.data.Dataset:
    """The article's pipeline; `batch_size` 0 makes each batch the client's whole dataset (B = inf)."""
    size = batch_size or whole_dataset_size(dataset)
    return (dataset.repeat(epochs).shuffle(shuffle_buffer, seed=seed).batch(size)
            .map(batch_format_fn).prefetch(prefetch_buffer))


def whole_dataset_size(dataset: tf.data.Dataset) -> int:
    """The number of examples, at least 1 (a batch size)."""
    return max(count_examples(dataset), 1)


def count_examples(dataset: tf.data.Dataset) -> int:
    """The number of elements; counted when tf.data does not know it (EMNIST's SQL-backed client datasets)."""
    size = int(dataset.cardinality())
    if size < 0:
        size = int(dataset.reduce(np.int64(0), lambda count, _: count + 1))
    return size


def make_federated_data(client_data: tff.simulation.datasets.ClientData, client_ids: Sequence[str],
                        **preprocess_kwargs) -> list[tf.data.Dataset]:
    return [preprocess(client_data.create_tf_dataset_for_client(x), **preprocess_kwargs)
            for x in client_ids]


def round_shuffle_seed(seed: int, round_num: int, client_id: str) -> np.int64:
    """The shuffle seed of one client in one round: a new order every round, the same one in every run
    with `seed` and after a resume (it depends on nothing else).

    A NumPy integer, not a Python one: TensorFlow keeps every Python number it converts to a tensor in a
    cache that is never emptied, and a run draws a new seed per client and round (docs/performance.md,
    "Memory of long runs"). The shuffle is the same for either."""
    key = f"{seed}/{round_num}/{client_id}".encode()
    return np.int64(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The article's `preprocess` arguments, and which shuffle seed each client's pipeline gets in a round.

    `per_round`: `round_shuffle_seed`, so every round visits a client's examples in a new order, as a
    pipeline shuffled afresh would. Otherwise `shuffle_seed` every round: the article's datasets, rebuilt
    by TFF every round with one seed, then repeat one order per client over the whole run.
    """

    epochs: int = NUM_EPOCHS
    batch_size: int = BATCH_SIZE
    shuffle_buffer: int = SHUFFLE_BUFFER
    prefetch_buffer: int = PREFETCH_BUFFER
    shuffle_seed: int = SHUFFLE_SEED
    per_round: bool = True

    def seed(self, round_num: int, client_id: str) -> int | np.int64:
        return round_shuffle_seed(self.shuffle_seed, round_num, client_id) if self.per_round else self.shuffle_seed

    def pipeline(self, dataset: tf.data.Dataset, seed: int | None = None) -> tf.data.Dataset:
        """The article's `preprocess` with these settings (and `seed` for the shuffle, when given)."""
        return preprocess(dataset, self.epochs, self.batch_size, self.shuffle_buffer, self.prefetch_buffer,
                          self.shuffle_seed if seed is None else seed)

    def one_epoch(self) -> Preprocessing:
        """The same pipeline over one epoch: what evaluation reads."""
        return dataclasses.replace(self, epochs=1)


def make_round_data(client_data: tff.simulation.datasets.ClientData, client_ids: Sequence[str],
                    round_num: int, settings: Preprocessing) -> list[tf.data.Dataset]:
    """`make_federated_data` for one round: each client's pipeline shuffled with its seed for the round."""
    return [settings.pipeline(client_data.create_tf_dataset_for_client(x), settings.seed(round_num, x))
            for x in client_ids]


def check_examples(x: np.ndarray, y: np.ndarray, num_classes: int, where: str) -> None:
    """DataUnavailableError, naming `where` (a client and its file), when a client's examples (as
    `batch_format_fn` shapes them) have pixels that are not finite or outside [0, 1], or labels outside
    0..num_classes - 1: training on them would fail in the worker or learn from garbage."""
    from fedmnist.errors import DataUnavailableError

    if len(x) and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise DataUnavailableError(f"{where}: pixel values that are not finite or outside [0, 1]")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataUnavailableError(f"{where}: labels outside 0..{num_classes - 1} (found {y.min()}..{y.max()})")


def input_spec() -> collections.OrderedDict:
    """The element spec of a preprocessed dataset, as `from_keras_model` wants it."""
    return collections.OrderedDict(
        x=tf.TensorSpec(shape=[None, 784], dtype=tf.float32),
        y=tf.TensorSpec(shape=[None, 1], dtype=tf.int32))
