"""Step 1 of the article: the data sources (fedmnist.data.sources) and the article's preprocessing
(fedmnist.data.preprocessing), through the package's `fedmnist.data` names."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from fedmnist import data
from fedmnist.config import DataConfig
from fedmnist.errors import ConfigError
from fedmnist.data import preprocessing, sources
from helpers import write_emnist_sqlite

pytestmark = pytest.mark.unit

EMNIST_SPEC = collections.OrderedDict(
    label=tf.TensorSpec(shape=(), dtype=tf.int32),
    pixels=tf.TensorSpec(shape=(28, 28), dtype=tf.float32))


def examples(client_data, client_id):
    items = list(client_data.create_tf_dataset_for_client(client_id).as_numpy_iterator())
    return np.stack([e["pixels"] for e in items]), np.array([e["label"] for e in items])


def test_digits_are_emnist_style_images():
    pixels, labels = data.digits_as_emnist()
    assert pixels.shape == (1797, 28, 28) and pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert np.all(pixels[:, :4, :] == 1.0) and np.all(pixels[:, :, -4:] == 1.0)  # background border
    assert (pixels < 0.5).mean() > 0.05  # real ink, darker than the background
    assert sorted(np.unique(labels).tolist()) == list(range(10))


@pytest.mark.parametrize("loader", [data.load_digits, data.load_synthetic])
def test_offline_sources_have_the_emnist_element_spec(loader):
    dataset = loader(num_clients=8, seed=0)
    assert dataset.train.element_type_structure == EMNIST_SPEC
    assert dataset.test.element_type_structure == EMNIST_SPEC
    assert dataset.train.client_ids == dataset.test.client_ids
    assert len(dataset.train.client_ids) == 8


def test_digits_clients_hold_every_example_once_with_their_own_test_part():
    dataset = data.load_digits(num_clients=10, seed=0, test_fraction=0.2)
    total, test_total = 0, 0
    for client_id in dataset.train.client_ids:
        _, train_labels = examples(dataset.train, client_id)
        _, test_labels = examples(dataset.test, client_id)
        assert len(test_labels) >= 1
        assert abs(len(test_labels) / (len(train_labels) + len(test_labels)) - 0.2) < 0.05
        total += len(train_labels) + len(test_labels)
        test_total += len(test_labels)
    assert total == 1797


def test_digits_split_is_reproducible_from_the_seed():
    first = examples(data.load_digits(num_clients=5, seed=4).train, "client_0")
    again = examples(data.load_digits(num_clients=5, seed=4).train, "client_0")
    other = examples(data.load_digits(num_clients=5, seed=5).train, "client_0")
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])


def test_preprocess_is_the_article_pipeline():
    dataset = data.load_digits(num_clients=10, seed=0)
    client_id = dataset.train.client_ids[0]
    raw_count = len(examples(dataset.train, client_id)[1])
    batches = list(data.preprocess(dataset.train.create_tf_dataset_for_client(client_id)))
    assert all(b["x"].shape[1:] == (784,) and b["y"].shape[1:] == (1,) for b in batches)
    assert all(b["x"].shape[0] == 20 for b in batches[:-1])
    assert sum(int(b["y"].shape[0]) for b in batches) == 5 * raw_count
    assert batches[0]["x"].dtype == tf.float32 and batches[0]["y"].dtype == tf.int32
    # The shuffle is seeded: a fresh pipeline yields the same first-iteration order.
    again = list(data.preprocess(dataset.train.create_tf_dataset_for_client(client_id)))
    assert all(np.array_equal(a["y"], b["y"]) for a, b in zip(batches, again))


def test_batch_format_fn_flattens_and_reshapes():
    element = {"pixels": tf.zeros([3, 28, 28]), "label": tf.constant([1, 2, 3], dtype=tf.int32)}
    batch = data.batch_format_fn(element)
    assert list(batch) == ["x", "y"]
    assert batch["x"].shape == (3, 784) and batch["y"].shape == (3, 1)


def test_make_federated_data_gives_one_dataset_per_client():
    dataset = data.load_synthetic(num_clients=6, seed=0)
    federated = data.make_federated_data(dataset.train, dataset.train.client_ids[:4], epochs=1)
    assert len(federated) == 4
    assert federated[0].element_spec == data.input_spec()


# --- Federated EMNIST through TFF's own loader, from a file in its exact format ------------------

def fake_emnist(tmp_path, seed=0):
    rng = np.random.default_rng(seed)

    def client(n):
        return rng.uniform(0, 1, (n, 28, 28)).astype(np.float32), rng.integers(0, 10, n)

    clients = {
        "digits_only_train": {"f0000_14": client(5), "f0001_41": client(3)},
        "digits_only_test": {"f0000_14": client(2), "f0001_41": client(1)},
        "all_train": {"f0000_14": client(6)},
        "all_test": {"f0000_14": client(2)},
    }
    write_emnist_sqlite(tmp_path / data.EMNIST_FILE, clients)
    return clients


def test_emnist_loads_through_tff_from_the_cache(tmp_path):
    written = fake_emnist(tmp_path)
    dataset = data.load_emnist(only_digits=True, cache_dir=tmp_path)
    assert dataset.name == "emnist" and dataset.num_classes == 10
    assert sorted(dataset.train.client_ids) == ["f0000_14", "f0001_41"]
    assert dataset.train.element_type_structure == EMNIST_SPEC
    pixels, labels = examples(dataset.train, "f0000_14")
    want_pixels, want_labels = written["digits_only_train"]["f0000_14"]
    assert np.allclose(pixels, want_pixels) and np.array_equal(labels, want_labels)
    assert len(examples(dataset.test, "f0001_41")[1]) == 1
    everything = data.load_emnist(only_digits=False, cache_dir=tmp_path)
    assert everything.num_classes == 62 and everything.train.client_ids == ["f0000_14"]


def test_auto_prefers_cached_emnist_and_the_environment_names_the_cache(tmp_path, monkeypatch):
    fake_emnist(tmp_path)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    assert data.load_dataset(DataConfig(dataset="auto")).name == "emnist"


def test_auto_falls_back_to_digits_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: False)
    dataset = data.load_dataset(DataConfig(dataset="auto", cache_dir=str(tmp_path)))
    assert dataset.name == "digits"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning:")


def test_auto_falling_back_to_digits_refuses_more_clients_than_the_digits_hold(tmp_path, monkeypatch):
    # The config's check could not know the digits would stand in: it was a ValueError from the split, exit 1.
    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: False)
    with pytest.raises(ConfigError, match=r"data.num_clients: digits has 1,797 examples, too few for 1,000 clients"):
        data.load_dataset(DataConfig(dataset="auto", cache_dir=str(tmp_path), num_clients=1000))


def test_explicit_emnist_without_cache_or_network_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: False)
    with pytest.raises(data.DataUnavailableError, match="cannot be downloaded"):
        data.load_emnist(cache_dir=tmp_path)
    assert not (tmp_path / data.EMNIST_FILE).exists()


def test_a_corrupt_emnist_file_is_named(tmp_path):
    (tmp_path / data.EMNIST_FILE).write_bytes(b"this is not sqlite")
    with pytest.raises(data.DataUnavailableError, match="unreadable"):
        data.load_emnist(cache_dir=tmp_path)


def test_the_package_names_are_the_modules_own():
    for name in preprocessing.__name__, sources.__name__:
        assert name.startswith("fedmnist.data.")
    assert data.preprocess is preprocessing.preprocess and data.input_spec is preprocessing.input_spec
    assert data.load_dataset is sources.load_dataset and data.FederatedDataset is sources.FederatedDataset
    assert set(data.__all__) <= set(dir(preprocessing)) | set(dir(sources))
    with pytest.raises(AttributeError, match="no attribute 'emnist_cache_dir'"):
        data.emnist_cache_dir  # noqa: B018 - lives in fedmnist.data.sources only
