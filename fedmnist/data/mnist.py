"""MNIST as McMahan et al. 2017 use it: the 60,000 training images dealt to clients, the 10,000 test
images kept whole for the server's centralized evaluation.

The file is Keras's `mnist.npz` (`x_train`, `y_train`, `x_test`, `y_test`; uint8 images 28x28, 0 =
background), downloaded by `tf.keras.datasets.mnist.load_data(path=...)` into `data.cache_dir`, else
`$FEDMNIST_MNIST_CACHE`, else Keras's own cache (`~/.keras/datasets`). Images are converted to federated
EMNIST's convention (float32 in [0, 1], 1.0 = background), so every model and pipeline takes them as is.

Partitions (`data.partition`), with `data.num_clients` clients (the paper: 100):
- `iid`: the training images shuffled and dealt evenly (100 clients x 600);
- `shards`: sorted by label, cut into 2 x clients shards (200 x 300), two random shards per client;
- `dirichlet`: label skew as for the other sources.
Each client also gets test images: with `shards`, the label-sorted test set cut into as many shards and
dealt by the same shard assignment, so a client's test labels follow its training labels; otherwise
dealt IID. Federated evaluation reads them; centralized evaluation uses the whole test set.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf

from fedmnist.data import partition
from fedmnist.data.sources import (cache_dir, client_data_from_arrays, digits_as_emnist, download_whole,
                                   ensure_cached)
from fedmnist.data.types import FederatedDataset
from fedmnist.errors import DataUnavailableError

MNIST_FILE = "mnist.npz"
CACHE_ENV = "FEDMNIST_MNIST_CACHE"
KEYS = ("x_train", "y_train", "x_test", "y_test")

Split = tuple[np.ndarray, np.ndarray]


def mnist_cache_dir(configured: str | None = None) -> Path:
    """The configured directory, else $FEDMNIST_MNIST_CACHE, else Keras's cache `~/.keras/datasets`."""
    return cache_dir(configured, CACHE_ENV, Path.home() / ".keras" / "datasets")


def _download(scratch: Path) -> None:
    """Given an absolute path, Keras's `load_data` downloads to it and checks the file's SHA-256 against MNIST's."""
    try:
        tf.keras.datasets.mnist.load_data(path=str(scratch / MNIST_FILE))
    except Exception as error:  # noqa: BLE001 - Keras raises a bare Exception for a failed fetch
        raise DataUnavailableError(f"MNIST could not be downloaded: {error}") from error


def read_npz(path: Path) -> tuple[Split, Split]:
    """`(x_train, y_train), (x_test, y_test)` from a Keras `mnist.npz`, as `load_data` returns them.

    A cached file is read here rather than through `load_data`, which hashes it again on every load and
    downloads it afresh on a mismatch: a file copied in by hand then still loads offline.
    """
    try:
        with np.load(path, allow_pickle=False) as arrays:
            x_train, y_train, x_test, y_test = (arrays[key] for key in KEYS)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise DataUnavailableError(f"{MNIST_FILE} in the MNIST cache is unreadable: {error}") from error
    for name, (x, y) in (("train", (x_train, y_train)), ("test", (x_test, y_test))):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (len(x),) or len(x) < 2:
            raise DataUnavailableError(f"{MNIST_FILE} in the MNIST cache is unreadable: x_{name} {x.shape} "
                                       f"and y_{name} {y.shape} are not 28x28 images with one label each")
        finite = np.issubdtype(x.dtype, np.integer) or np.isfinite(x).all()
        if not (finite and 0 <= x.min() and x.max() <= 255):  # an int32 array can hold 300 or -5 too
            raise DataUnavailableError(f"{MNIST_FILE} in the MNIST cache is unreadable: x_{name} holds pixel values "
                                       f"that are not finite or outside 0..255")
        if y.min() < 0 or y.max() > 9:
            raise DataUnavailableError(f"{MNIST_FILE} in the MNIST cache is unreadable: y_{name} holds "
                                       f"labels outside 0..9")
    return (x_train, y_train), (x_test, y_test)


def load_arrays(cache_dir: str | Path | None = None, allow_download: bool = True) -> tuple[Split, Split]:
    """MNIST's arrays from the cache, downloaded first when missing and allowed."""
    cache = mnist_cache_dir(str(cache_dir) if cache_dir else None)
    ensure_cached(cache / MNIST_FILE, allow_download, "MNIST", CACHE_ENV, f"Keras's {MNIST_FILE}", lambda: download_whole(cache, MNIST_FILE, _download))
    return read_npz(cache / MNIST_FILE)


def as_emnist(images: np.ndarray) -> np.ndarray:
    """uint8 MNIST images (0 = background) as float32 in [0, 1] with 1.0 = background, as EMNIST."""
    return 1.0 - images.astype(np.float32) / 255.0


def client_parts(train_labels: np.ndarray, test_labels: np.ndarray, num_clients: int, method: str,
                 seed: int, alpha: float = 0.5) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's training and test indices; the training parts are `partition.partition`'s."""
    if method != "shards":
        test_rng = np.random.default_rng([seed, 2])
        return (partition.partition(train_labels, num_clients, method, seed, alpha=alpha),
                partition.iid(test_labels, num_clients, test_rng))
    if num_clients > len(test_labels) // 2:
        raise ValueError(f"{num_clients} clients need at least {2 * num_clients} test examples, "
                         f"the data has {len(test_labels)}")
    # The same draws as partition.shards, so the training parts equal partition.partition(..., "shards").
    rng = np.random.default_rng(seed)
    train_pieces = partition.sorted_shards(train_labels, 2 * num_clients, rng)
    order = rng.permutation(2 * num_clients)
    test_pieces = partition.sorted_shards(test_labels, 2 * num_clients, np.random.default_rng([seed, 2]))
    return (partition.deal_shards(train_pieces, num_clients, order),
            partition.deal_shards(test_pieces, num_clients, order))


def as_mnist(images: np.ndarray) -> np.ndarray:
    """uint8 MNIST images as float32 in [0, 1] keeping MNIST's 0.0 = background (McMahan et al.'s input)."""
    return images.astype(np.float32) / 255.0


def federate(train: Split, test: Split, num_clients: int = 100, method: str = "iid", seed: int = 0,
             alpha: float = 0.5, pixels: str = "emnist") -> FederatedDataset:
    """MNIST's arrays as a federated population, the whole test set kept for centralized evaluation; `pixels`
    "emnist" (1.0 = background, as every source) or "mnist" (0.0 = background)."""
    convert = as_mnist if pixels == "mnist" else as_emnist
    (x_train, y_train), (x_test, y_test) = train, test
    y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    train_parts, test_parts = client_parts(y_train, y_test, num_clients, method, seed, alpha)
    width = len(str(num_clients - 1))
    ids = [f"client_{number:0{width}d}" for number in range(num_clients)]
    # Converted client by client from uint8: the float copy of the training set is built only once.
    clients_train = {cid: (convert(x_train[p]), y_train[p]) for cid, p in zip(ids, train_parts)}
    clients_test = {cid: (convert(x_test[p]), y_test[p]) for cid, p in zip(ids, test_parts)}
    return FederatedDataset("mnist", client_data_from_arrays(clients_train), client_data_from_arrays(clients_test),
                            10, central_test=(convert(x_test), y_test), partition=method)


def load_mnist(num_clients: int = 100, method: str = "iid", seed: int = 0, alpha: float = 0.5,
               cache_dir: str | Path | None = None, allow_download: bool = True,
               pixels: str = "emnist") -> FederatedDataset:
    train, test = load_arrays(cache_dir, allow_download)
    dataset = federate(train, test, num_clients, method, seed, alpha, pixels)
    return dataclasses.replace(dataset, origin=str(mnist_cache_dir(str(cache_dir) if cache_dir else None) / MNIST_FILE))


def digits_as_mnist(test_size: int = 297, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's 1,797 real handwritten digits in MNIST's format (uint8 28x28, 0 = background),
    split into train and test: a small stand-in for MNIST where it cannot be downloaded."""
    pixels, labels = digits_as_emnist()
    images = np.round((1.0 - pixels) * 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = order[:test_size], order[test_size:]
    return (images[train], labels[train]), (images[test], labels[test])


def write_npz(path: str | Path, train: Split, test: Split) -> Path:
    """Writes arrays in Keras's `mnist.npz` format (uint8 images, uint8 labels): for offline tests and
    the notebook's stand-in file."""
    (x_train, y_train), (x_test, y_test) = train, test
    path = Path(path)
    np.savez_compressed(path, x_train=x_train.astype(np.uint8), y_train=y_train.astype(np.uint8),
                        x_test=x_test.astype(np.uint8), y_test=y_test.astype(np.uint8))
    return path
