"""Step 1 of the article: the federated data, from federated EMNIST or offline sources.

Every source yields `tff.simulation.datasets.ClientData` with federated EMNIST's element spec:
`OrderedDict(label=int32 scalar, pixels=float32 28x28)`, pixels in [0, 1] with 1.0 = background.
The sources are listed in fedmnist/data/builtin.py; `load_dataset` loads the configured one.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import socket
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import registry
from fedmnist.config import DataConfig
from fedmnist.data import partition
from fedmnist.data.preprocessing import IMAGE_SHAPE
from fedmnist.data.types import FederatedDataset
from fedmnist.errors import DataUnavailableError

EMNIST_FILE = "emnist_all.sqlite"
EMNIST_HOST = ("storage.googleapis.com", 443)
CACHE_ENV = "FEDMNIST_EMNIST_CACHE"


# --- In-memory client data ---------------------------------------------------------------

EXAMPLES_SPEC = collections.OrderedDict(label=tf.TensorSpec([None], tf.int32),
                                        pixels=tf.TensorSpec([None, 28, 28], tf.float32))


@tf.function(input_signature=[EXAMPLES_SPEC], autograph=False)
def examples_dataset(examples: collections.OrderedDict) -> tf.data.Dataset:
    """A client's examples, one EMNIST-like element each, from arrays of any length.

    Built eagerly, `from_tensor_slices` would record each client's length in its op and TensorFlow
    would keep a kernel per distinct length, so memory would grow with every new client size sampled.
    No AutoGraph: there is no control flow to convert, and converting it cost a fresh process 0.3 s.
    """
    return tf.data.Dataset.from_tensor_slices(examples)

def client_data_from_arrays(clients: dict[str, tuple[np.ndarray, np.ndarray]]
                            ) -> tff.simulation.datasets.ClientData:
    """A ClientData over `{client_id: (pixels, labels)}` numpy arrays held in memory."""
    tensors = {cid: collections.OrderedDict(label=labels.astype(np.int32),
                                            pixels=pixels.astype(np.float32))
               for cid, (pixels, labels) in clients.items()}

    def dataset_fn(client_id: str) -> tf.data.Dataset:
        return examples_dataset(tensors[client_id])

    return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(list(tensors), dataset_fn)


def _split_clients(pixels: np.ndarray, labels: np.ndarray, parts: list[np.ndarray],
                   test_fraction: float, seed: int, name: str, num_classes: int, method: str) -> FederatedDataset:
    rng = np.random.default_rng([seed, 1])
    width = len(str(len(parts) - 1))
    train, test = {}, {}
    for number, indices in enumerate(parts):
        client_id = f"client_{number:0{width}d}"
        train_idx, test_idx = partition.train_test_split(indices, test_fraction, rng)
        train[client_id] = (pixels[train_idx], labels[train_idx])
        test[client_id] = (pixels[test_idx], labels[test_idx])
    return FederatedDataset(name, client_data_from_arrays(train), client_data_from_arrays(test),
                            num_classes, partition=method)


# --- digits: real handwriting that ships with scikit-learn ------------------------------------

def digits_as_emnist() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as 28x28 EMNIST-style images (1.0 = background) and int32 labels.

    The 8x8 images (0..16 = ink) are inverted, scaled to 20x20 and centred in 28x28, as MNIST
    centres its digits in a 20x20 box.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = digits.images.astype(np.float32)[..., None] / 16.0
    scaled = tf.image.resize(ink, (20, 20), method="bilinear").numpy()[..., 0]
    images = np.pad(np.clip(scaled, 0.0, 1.0), ((0, 0), (4, 4), (4, 4)))
    return 1.0 - images, digits.target.astype(np.int32)


def load_digits(num_clients: int = 20, method: str = "iid", seed: int = 0, alpha: float = 0.5,
                test_fraction: float = 0.2) -> FederatedDataset:
    pixels, labels = digits_as_emnist()
    parts = partition.partition(labels, num_clients, method, seed, alpha=alpha)
    return _split_clients(pixels, labels, parts, test_fraction, seed, "digits", 10, method)


# --- synthetic: learnable random data --------------------------------------------------------

def load_synthetic(num_clients: int = 20, examples_per_client: int = 50, seed: int = 0,
                   method: str = "iid", alpha: float = 0.5, test_fraction: float = 0.2,
                   num_classes: int = 10) -> FederatedDataset:
    """Noisy copies of one random 28x28 prototype per class."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0.0, 1.0, size=(num_classes, *IMAGE_SHAPE))
    labels = rng.integers(0, num_classes, size=num_clients * examples_per_client).astype(np.int32)
    noise = rng.normal(0.0, 0.35, size=(len(labels), *IMAGE_SHAPE))
    pixels = np.clip(prototypes[labels] + noise, 0.0, 1.0).astype(np.float32)
    parts = partition.partition(labels, num_clients, method, seed, alpha=alpha)
    return _split_clients(pixels, labels, parts, test_fraction, seed, "synthetic", num_classes, method)


# --- emnist: the real federated EMNIST ---------------------------------------------------------

def cache_dir(configured: str | Path | None, env: str, default: Path) -> Path:
    """The configured directory, else the directory in $`env`, else `default`."""
    chosen = configured or os.environ.get(env) or default
    return Path(chosen).expanduser()


def emnist_cache_dir(configured: str | None = None) -> Path:
    """The configured directory, else $FEDMNIST_EMNIST_CACHE, else TFF's default ~/.tff."""
    return cache_dir(configured, CACHE_ENV, Path.home() / ".tff")


def emnist_is_cached(cache_dir: Path) -> bool:
    return (cache_dir / EMNIST_FILE).is_file()


def can_download(timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection(EMNIST_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def ensure_cached(path: Path, allow_download: bool, name: str, cache_env: str, holding: str,
                  download: Callable[[], None]) -> None:
    """Downloads `path` when it is missing and allowed; otherwise one clear `DataUnavailableError`."""
    if path.is_file():
        return
    if not (allow_download and can_download()):
        raise DataUnavailableError(
            f"{name} is not cached ({path.name} in the cache directory) and cannot be downloaded (no "
            f"network, or data.allow_download is false); set data.cache_dir or ${cache_env} to a directory "
            f"holding {holding}, or use --dataset digits")
    download()


def download_whole(directory: Path, name: str, fetch: Callable[[Path], None]) -> None:
    """`fetch(scratch)` downloads file `name` into a scratch directory inside `directory`; the file is then
    moved in whole, so an interrupted download never leaves a truncated file that later loads would trust."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as scratch:
        fetch(Path(scratch))
        os.replace(Path(scratch) / name, directory / name)


def _download_emnist(scratch: Path) -> None:
    tff.simulation.datasets.emnist.load_data(cache_dir=str(scratch))


def load_emnist(only_digits: bool = True, cache_dir: str | Path | None = None,
                allow_download: bool = True) -> FederatedDataset:
    cache = emnist_cache_dir(str(cache_dir) if cache_dir else None)
    ensure_cached(cache / EMNIST_FILE, allow_download, "federated EMNIST", CACHE_ENV, EMNIST_FILE,
                  lambda: download_whole(cache, EMNIST_FILE, _download_emnist))
    try:
        train, test = tff.simulation.datasets.emnist.load_data(only_digits=only_digits,
                                                               cache_dir=str(cache))
    except (sqlite3.Error, tf.errors.OpError, ValueError) as error:
        raise DataUnavailableError(f"{EMNIST_FILE} in the EMNIST cache is unreadable: {error}") from error
    if not train.client_ids:
        raise DataUnavailableError(f"{EMNIST_FILE} in the EMNIST cache holds no clients for this split")
    return FederatedDataset("emnist", train, test, 10 if only_digits else 62, origin=str(cache / EMNIST_FILE))


def cap(dataset: FederatedDataset, max_clients: int = 0, max_examples: int = 0) -> FederatedDataset:
    """The first `max_clients` clients, each with its first `max_examples` examples (0 = no cap)."""
    if not max_clients and not max_examples:
        return dataset
    ids = dataset.train.client_ids[:max_clients or None]

    def capped(client_data):
        def dataset_fn(client_id):
            examples = client_data.serializable_dataset_fn(client_id)
            return examples.take(max_examples) if max_examples else examples

        return tff.simulation.datasets.ClientData.from_clients_and_tf_fn(ids, dataset_fn)

    return dataclasses.replace(dataset, train=capped(dataset.train), test=capped(dataset.test))


def pooled_test_set(dataset: FederatedDataset) -> tuple[np.ndarray, np.ndarray]:
    """The test set the server evaluates on, as model inputs: pixels (n, 784) float32, labels (n, 1) int32.

    The source's own test set when it has one (MNIST's 10,000 images, even when `data.max_clients`
    keeps fewer clients), else every test client's examples together.
    """
    if dataset.central_test is not None:
        pixels, labels = dataset.central_test
    else:
        # Client by client in id order (`create_tf_dataset_from_all_clients` shuffles the clients).
        batches = [(b["pixels"].numpy(), b["label"].numpy()) for client_id in dataset.test.client_ids
                   for b in dataset.test.create_tf_dataset_for_client(client_id).batch(4096)]
        pixels = np.concatenate([x for x, _ in batches]) if batches else np.zeros([0, *IMAGE_SHAPE], np.float32)
        labels = np.concatenate([y for _, y in batches]) if batches else np.zeros([0], np.int32)
    return (np.asarray(pixels, np.float32).reshape(-1, 784), np.asarray(labels, np.int32).reshape(-1, 1))


def load_dataset(cfg: DataConfig, seed: int = 0) -> FederatedDataset:
    """Loads the configured source, capped by `max_clients` and `max_examples_per_client`."""
    return cap(registry.SOURCES.get(cfg.dataset).load(cfg, seed), cfg.max_clients, cfg.max_examples_per_client)
