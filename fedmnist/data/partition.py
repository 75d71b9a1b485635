"""Splitting one centralized labelled dataset into federated clients.

Each partitioner takes the labels and a seeded `numpy.random.Generator` and returns one array of
example indices per client. `iid` deals examples out evenly at random; `dirichlet` draws each
client's share of every class from Dirichlet(alpha) (small alpha, strong label skew; Hsu et al. 2019);
`shards` sorts by label, cuts the data into 2 * clients shards and gives each client two of them, as in
McMahan et al. 2017, so most clients hold only two digits.
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "shards")


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float,
              min_examples: int = 2, max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed clients; redraws until every client holds at least `min_examples`."""
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_examples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"dirichlet partition: could not give each of {num_clients} clients "
                     f"{min_examples} examples with alpha={alpha}; use fewer clients or a larger alpha")


def sorted_shards(labels: np.ndarray, num_shards: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The examples sorted by label, cut into `num_shards` consecutive shards of (nearly) equal size.

    A shard that spans the end of one label and the start of the next holds two labels.
    """
    # A stable sort on a random permutation: label order, random order within each label.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    return np.array_split(by_label, num_shards)


def deal_shards(pieces: list[np.ndarray], num_clients: int, order: np.ndarray) -> list[np.ndarray]:
    """Client c gets the shards `order[c]`, `order[c + num_clients]`, ...: with a random `order`, a
    random set of shards each."""
    return [np.sort(np.concatenate([pieces[i] for i in order[c::num_clients]]))
            for c in range(num_clients)]


def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
           shards_per_client: int = 2) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-IID split: on MNIST's 60,000 training images with 100 clients,
    200 shards of 300 label-sorted images and two shards per client."""
    pieces = sorted_shards(labels, num_clients * shards_per_client, rng)
    return deal_shards(pieces, num_clients, rng.permutation(len(pieces)))


def partition(labels: np.ndarray, num_clients: int, method: str, seed: int,
              alpha: float = 0.5) -> list[np.ndarray]:
    """Indices of each client's examples, reproducible from `seed`."""
    if num_clients > len(labels) // 2:
        raise ValueError(f"{num_clients} clients need at least {2 * num_clients} examples, "
                         f"the data has {len(labels)}")
    rng = np.random.default_rng(seed)
    if method == "iid":
        return iid(labels, num_clients, rng)
    if method == "dirichlet":
        return dirichlet(labels, num_clients, rng, alpha)
    if method == "shards":
        return shards(labels, num_clients, rng)
    raise ValueError(f"unknown partition {method!r}; choose one of {', '.join(PARTITIONS)}")


def train_test_split(indices: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Splits one client's examples; both parts keep at least one example."""
    shuffled = rng.permutation(indices)
    num_test = min(max(1, round(test_fraction * len(indices))), len(indices) - 1)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])
