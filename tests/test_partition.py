"""Splitting examples into clients (fedmnist.data.partition)."""

import numpy as np
import pytest

from fedmnist.data import partition

pytestmark = pytest.mark.unit


def labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def label_concentration(y, parts):
    """Mean share of each client's most common label: 0.1-ish for IID digits, 1.0 for one label."""
    return np.mean([np.bincount(y[p]).max() / len(p) for p in parts])


@pytest.mark.parametrize("method", partition.PARTITIONS)
def test_every_example_goes_to_exactly_one_client(method):
    y = labels()
    parts = partition.partition(y, 20, method, seed=3, alpha=0.5)
    assert len(parts) == 20
    together = np.concatenate(parts)
    assert sorted(together.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 2


@pytest.mark.parametrize("method", partition.PARTITIONS)
def test_same_seed_same_split_other_seed_other_split(method):
    y = labels()
    first = partition.partition(y, 10, method, seed=1, alpha=0.5)
    again = partition.partition(y, 10, method, seed=1, alpha=0.5)
    other = partition.partition(y, 10, method, seed=2, alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_are_balanced():
    sizes = [len(p) for p in partition.partition(labels(1003), 10, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    y = labels(5000)
    iid = label_concentration(y, partition.partition(y, 20, "iid", seed=0))
    mild = label_concentration(y, partition.partition(y, 20, "dirichlet", seed=0, alpha=10.0))
    strong = label_concentration(y, partition.partition(y, 20, "dirichlet", seed=0, alpha=0.1))
    assert iid < 0.2
    assert mild < strong
    assert strong > 0.5


def test_shards_give_most_clients_two_labels():
    y = labels(2000)
    parts = partition.partition(y, 20, "shards", seed=0)
    label_counts = [len(np.unique(y[p])) for p in parts]
    assert max(label_counts) <= 4  # a shard can straddle a label boundary
    assert np.median(label_counts) <= 2


def test_too_many_clients_is_refused():
    with pytest.raises(ValueError, match="need at least"):
        partition.partition(labels(10), 6, "iid", seed=0)


def test_train_test_split_keeps_both_parts_non_empty():
    rng = np.random.default_rng(0)
    for size in (2, 3, 10, 101):
        train, test = partition.train_test_split(np.arange(size), 0.2, rng)
        assert len(train) >= 1 and len(test) >= 1
        assert sorted(np.concatenate([train, test]).tolist()) == list(range(size))
