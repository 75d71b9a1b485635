"""McMahan et al. 2017's MNIST experiments: the data, its partitions, the 2NN, FedSGD, centralized
evaluation, rounds to target, the shipped configs and the notebook (fedmnist/data/mnist.py and others).

MNIST cannot be downloaded here: the real loading code reads small files written in Keras's exact
`mnist.npz` format.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from fedmnist import config as config_lib
from fedmnist.config import ConfigError, DataConfig
from fedmnist.data import mnist, partition, sources
from fedmnist.data.preprocessing import preprocess
from fedmnist.outputs import report, targets
from fedmnist.outputs.records import RoundRecord
from helpers import ROOT, Background, metrics_rows, quiet_train, scalars, train_main
from nbrun import execute_notebook, machine_paths_in, outputs_text

CONFIGS = ROOT / "configs" / "mcmahan2017"
NOTEBOOK = ROOT / "notebooks" / "fedavg_paper.ipynb"
EMNIST_SPEC = collections.OrderedDict(label=tf.TensorSpec([], tf.int32), pixels=tf.TensorSpec([28, 28], tf.float32))
# MNIST's label counts (training set, test set): the shards' label boundaries fall where they do on MNIST.
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def labels_with_counts(counts: list[int], seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    return np.random.default_rng(seed).permutation(labels)


def fake_arrays(train: int = 240, test: int = 60, seed: int = 0):
    """Random uint8 images and labels 0..9, in mnist.npz's dtypes and shapes."""
    rng = np.random.default_rng(seed)
    return ((rng.integers(0, 256, (train, 28, 28), dtype=np.uint8), rng.integers(0, 10, train).astype(np.uint8)),
            (rng.integers(0, 256, (test, 28, 28), dtype=np.uint8), rng.integers(0, 10, test).astype(np.uint8)))


def write_fake_mnist(directory: Path, **sizes) -> tuple:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = fake_arrays(**sizes)
    mnist.write_npz(directory / mnist.MNIST_FILE, *arrays)
    return arrays


def client_examples(client_data, client_id) -> tuple[np.ndarray, np.ndarray]:
    batch = next(iter(client_data.create_tf_dataset_for_client(client_id).batch(100_000)))
    return batch["pixels"].numpy(), batch["label"].numpy()


# --- 1. data.dataset: mnist -----------------------------------------------------------------------

@pytest.mark.unit
def test_mnist_loads_from_the_cache_with_the_emnist_element_spec(tmp_path):
    (x_train, y_train), (x_test, y_test) = write_fake_mnist(tmp_path)
    with np.load(tmp_path / mnist.MNIST_FILE) as written:  # Keras's keys, dtypes and shapes
        assert sorted(written.files) == sorted(mnist.KEYS)
        assert written["x_train"].dtype == np.uint8 and written["x_test"].shape == (60, 28, 28)
    dataset = sources.load_dataset(DataConfig(dataset="mnist", cache_dir=str(tmp_path), num_clients=10,
                                              allow_download=False))
    assert dataset.name == "mnist" and dataset.num_classes == 10 and len(dataset.train.client_ids) == 10
    assert dataset.train.element_type_structure == EMNIST_SPEC == dataset.test.element_type_structure
    # Every training image exactly once, inverted to EMNIST's convention (1.0 = background).
    seen = {}
    for client_id in dataset.train.client_ids:
        pixels, labels = client_examples(dataset.train, client_id)
        assert pixels.dtype == np.float32 and pixels.min() >= 0.0 and pixels.max() <= 1.0
        for image, label in zip(pixels, labels):
            seen[image.tobytes()] = label
    assert len(seen) == len(x_train)
    expected = {(1.0 - x.astype(np.float32) / 255.0).tobytes(): y for x, y in zip(x_train, y_train)}
    assert seen == expected
    # The whole test set, pooled for the server; and dealt to the clients for federated evaluation.
    pixels, labels = sources.pooled_test_set(dataset)
    assert pixels.shape == (60, 784) and labels.shape == (60, 1) and labels.dtype == np.int32
    assert np.allclose(pixels, 1.0 - x_test.reshape(-1, 784) / 255.0) and np.array_equal(labels[:, 0], y_test)
    assert sum(len(client_examples(dataset.test, c)[1]) for c in dataset.test.client_ids) == 60


@pytest.mark.unit
def test_without_a_test_set_of_its_own_the_pooled_test_set_is_every_clients_test_data():
    dataset = sources.load_synthetic(num_clients=5, examples_per_client=20, seed=2)
    pixels, labels = sources.pooled_test_set(dataset)
    parts = [client_examples(dataset.test, c) for c in dataset.test.client_ids]
    assert pixels.shape == (sum(len(y) for _, y in parts), 784) and labels.shape == (len(pixels), 1)
    assert np.allclose(pixels, np.concatenate([x for x, _ in parts]).reshape(-1, 784))
    assert np.array_equal(labels[:, 0], np.concatenate([y for _, y in parts]))


@pytest.mark.unit
def test_the_cache_is_configured_else_the_environment_else_keras(tmp_path, monkeypatch):
    monkeypatch.setenv(mnist.CACHE_ENV, str(tmp_path / "env"))
    assert mnist.mnist_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    assert mnist.mnist_cache_dir() == tmp_path / "env"
    monkeypatch.delenv(mnist.CACHE_ENV)
    assert mnist.mnist_cache_dir() == Path.home() / ".keras" / "datasets"
    write_fake_mnist(tmp_path / "env")
    monkeypatch.setenv(mnist.CACHE_ENV, str(tmp_path / "env"))
    assert sources.load_dataset(DataConfig(dataset="mnist", num_clients=4, allow_download=False)).name == "mnist"


@pytest.mark.unit
def test_missing_mnist_without_network_or_download_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: False)
    with pytest.raises(sources.DataUnavailableError, match="MNIST is not cached .* cannot be downloaded"):
        mnist.load_mnist(cache_dir=tmp_path)
    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: True)
    with pytest.raises(sources.DataUnavailableError, match="data.allow_download is false"):
        mnist.load_mnist(cache_dir=tmp_path, allow_download=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_a_missing_file_is_downloaded_through_keras_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_keras_load_data(path):
        calls.append(Path(path))
        assert Path(path).is_absolute() and Path(path).parent.parent == tmp_path / "cache"
        write_fake_mnist(Path(path).parent)
        return fake_arrays()

    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: True)
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", fake_keras_load_data)
    dataset = mnist.load_mnist(num_clients=4, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and len(dataset.train.client_ids) == 4
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [mnist.MNIST_FILE]  # no scratch left
    mnist.load_mnist(num_clients=4, cache_dir=tmp_path / "cache")
    assert len(calls) == 1  # cached now


@pytest.mark.unit
def test_a_failed_download_leaves_nothing_and_is_one_error(tmp_path, monkeypatch):
    def failing(path):
        Path(path).write_bytes(b"partial")
        raise Exception("URL fetch failure on https://example/mnist.npz: None -- timed out")

    monkeypatch.setattr(sources, "can_download", lambda timeout=3.0: True)
    monkeypatch.setattr(tf.keras.datasets.mnist, "load_data", failing)
    with pytest.raises(sources.DataUnavailableError, match="could not be downloaded"):
        mnist.load_mnist(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
@pytest.mark.parametrize("content", ["not a zip", "wrong shape", "missing key", "bad label", "int pixel 300",
                                     "int pixel -5", "float pixel 255.5", "infinite pixel"])
def test_an_unreadable_file_is_named(tmp_path, content):
    path = tmp_path / mnist.MNIST_FILE
    (x_train, y_train), (x_test, y_test) = fake_arrays()
    if content.endswith("pixel 300") or content.endswith("pixel -5"):
        pixels = x_train.astype(np.int32)
        pixels[1, 5, 5] = int(content.rsplit(" ", 1)[1])
        np.savez(path, x_train=x_train, y_train=y_train, x_test=pixels[:len(x_test)], y_test=y_test)
    elif "pixel" in content:
        pixels = x_train.astype(np.float32)
        pixels[1, 5, 5] = 255.5 if content.startswith("float") else np.inf
        np.savez(path, x_train=pixels, y_train=y_train, x_test=x_test, y_test=y_test)
    elif content == "not a zip":
        path.write_bytes(b"this is not an npz")
    elif content == "wrong shape":
        np.savez(path, x_train=x_train[:, :20], y_train=y_train, x_test=x_test, y_test=y_test)
    elif content == "missing key":
        np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test)
    else:
        np.savez(path, x_train=x_train, y_train=y_train + 10, x_test=x_test, y_test=y_test)
    expected = "holds pixel values" if "pixel" in content else "unreadable"
    with pytest.raises(sources.DataUnavailableError, match=expected):
        mnist.load_mnist(cache_dir=tmp_path, allow_download=False)


@pytest.mark.unit
def test_explicit_mnist_that_cannot_be_loaded_is_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    done = train_main("--dataset", "mnist", "--set", f"data.cache_dir={tmp_path / 'empty'}",
                      "--set", "data.allow_download=false", "--run-dir", "new")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "error: MNIST is not cached" in done.stderr
    assert "Traceback" not in done.stderr and list((tmp_path / "empty").iterdir()) == []


@pytest.mark.unit
def test_the_digits_stand_in_is_real_handwriting_in_mnist_format(tmp_path):
    (x_train, y_train), (x_test, y_test) = mnist.digits_as_mnist()
    assert x_train.dtype == np.uint8 and x_train.shape[1:] == (28, 28) and len(x_train) + len(x_test) == 1797
    assert x_train[:, 0, 0].max() == 0  # MNIST's convention: 0 = background
    mnist.write_npz(tmp_path / mnist.MNIST_FILE, (x_train, y_train), (x_test, y_test))
    (read_x, read_y), _ = mnist.read_npz(tmp_path / mnist.MNIST_FILE)
    assert np.array_equal(read_x, x_train) and np.array_equal(read_y, y_train)


# --- 2. The paper's partitions --------------------------------------------------------------------

@pytest.mark.unit
def test_iid_is_100_clients_of_600():
    y_train, y_test = labels_with_counts(MNIST_TRAIN_COUNTS), labels_with_counts(MNIST_TEST_COUNTS)
    train_parts, test_parts = mnist.client_parts(y_train, y_test, 100, "iid", seed=0)
    assert [len(p) for p in train_parts] == [600] * 100 and [len(p) for p in test_parts] == [100] * 100
    assert np.array_equal(np.sort(np.concatenate(train_parts)), np.arange(60_000))
    assert np.array_equal(np.sort(np.concatenate(test_parts)), np.arange(10_000))
    assert np.mean([len(np.unique(y_train[p])) for p in train_parts]) > 9.5


@pytest.mark.unit
def test_non_iid_is_two_shards_of_300_label_sorted_images_per_client():
    y_train, y_test = labels_with_counts(MNIST_TRAIN_COUNTS), labels_with_counts(MNIST_TEST_COUNTS)
    train_parts, test_parts = mnist.client_parts(y_train, y_test, 100, "shards", seed=0)
    assert [len(p) for p in train_parts] == [600] * 100
    assert np.array_equal(np.sort(np.concatenate(train_parts)), np.arange(60_000))
    assert np.array_equal(np.sort(np.concatenate(test_parts)), np.arange(10_000))
    # The same split as the `shards` partitioner the other sources use.
    same = partition.partition(y_train, 100, "shards", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(train_parts, same))
    # 200 shards of 300, sorted by label: a shard holds one label unless it spans a label boundary;
    # each client holds exactly two whole shards.
    pieces = partition.sorted_shards(y_train, 200, np.random.default_rng(0))
    assert [len(p) for p in pieces] == [300] * 200
    assert all(np.all(np.diff(y_train[p]) >= 0) for p in pieces)
    spanning = sum(len(np.unique(y_train[p])) == 2 for p in pieces)
    assert spanning == 9 and all(len(np.unique(y_train[p])) <= 2 for p in pieces)
    labels_per_client = [len(np.unique(y_train[p])) for p in train_parts]
    # "Most clients will only have examples of two digits": only a client holding one of the 9 shards
    # that span a label boundary can have more.
    assert sum(n <= 2 for n in labels_per_client) >= 100 - spanning and max(labels_per_client) <= 4


@pytest.mark.unit
def test_non_iid_clients_hold_at_most_two_labels_when_shards_do_not_span_labels():
    # 6,000 training and 1,000 test images per label: 20 shards per label, none spanning two labels.
    y_train, y_test = labels_with_counts([6000] * 10), labels_with_counts([1000] * 10, seed=1)
    train_parts, test_parts = mnist.client_parts(y_train, y_test, 100, "shards", seed=4)
    for train_part, test_part in zip(train_parts, test_parts):
        train_labels = set(np.unique(y_train[train_part]))
        assert 1 <= len(train_labels) <= 2
        # The test shards are dealt by the same assignment: a client's test labels are its training labels.
        assert set(np.unique(y_test[test_part])) == train_labels


@pytest.mark.unit
def test_shards_split_the_other_sources_as_before():
    """The `shards` partitioner, now built from sorted_shards and deal_shards, splits as it did."""
    def previous(labels, num_clients, rng, shards_per_client=2):
        shuffled = rng.permutation(len(labels))
        by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
        pieces = np.array_split(by_label, num_clients * shards_per_client)
        order = rng.permutation(len(pieces))
        return [np.sort(np.concatenate([pieces[i] for i in order[c::num_clients]])) for c in range(num_clients)]

    labels = np.random.default_rng(5).integers(0, 10, 1797)
    for seed, clients in ((0, 20), (3, 7)):
        new = partition.partition(labels, clients, "shards", seed)
        old = previous(labels, clients, np.random.default_rng(seed))
        assert all(np.array_equal(a, b) for a, b in zip(new, old))


# --- 4. The 2NN beside the CNN --------------------------------------------------------------------

@pytest.mark.unit
def test_the_papers_models_have_their_parameter_counts():
    from fedmnist.model import create_model

    mlp = create_model("2nn")
    assert mlp.count_params() == 199_210
    assert [layer.units for layer in mlp.layers if isinstance(layer, tf.keras.layers.Dense)] == [200, 200, 10]
    assert all(layer.activation is tf.keras.activations.relu for layer in mlp.layers[:2])
    assert create_model("cnn").count_params() == 1_663_370
    assert mlp(np.ones([3, 784], np.float32)).shape == (3, 10)


# --- 5. FedSGD: batch_size 0 is the whole client dataset --------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("known_size", [True, False])
def test_batch_size_0_batches_each_epoch_as_the_whole_dataset(known_size):
    examples = collections.OrderedDict(label=np.arange(37, dtype=np.int32) % 10,
                                       pixels=np.zeros([37, 28, 28], np.float32))
    dataset = tf.data.Dataset.from_tensor_slices(examples)
    if not known_size:  # as EMNIST's SQL-backed client datasets: tf.data cannot tell their size
        dataset = dataset.filter(lambda e: True)
        assert int(dataset.cardinality()) < 0
    batches = list(preprocess(dataset, epochs=1, batch_size=0))
    assert [len(b["y"]) for b in batches] == [37] and batches[0]["x"].shape == (37, 784)
    assert [len(b["y"]) for b in preprocess(dataset, epochs=3, batch_size=0)] == [37, 37, 37]


@pytest.mark.unit
def test_config_takes_batch_size_0_and_the_new_keys():
    config = config_lib.load(None, ["preprocess.batch_size=0", "model=2nn", "data.dataset=mnist",
                                    "data.num_clients=100", "centralized_eval_every=1", "accuracy_targets=[0.9]"])
    assert config.preprocess.batch_size == 0 and config.model == "2nn" and config.accuracy_targets == [0.9]
    assert config_lib.Config().centralized_eval_every is None  # the tutorial's runs are unchanged


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["preprocess.batch_size=-1"], "preprocess.batch_size: must be at least 0"),
    (["centralized_eval_every=-1"], "centralized_eval_every: must be at least 0"),
    (["accuracy_targets=[0.97, 1.5]"], "accuracy_targets[1]: 1.5 is not an accuracy in (0, 1]"),
    (["accuracy_targets=0.9"], "accuracy_targets: expected a list"),
    (["data.dataset=mnist", "data.num_clients=5"], "clients_per_round: 10 is more than the 5 clients"),
    (["data.dataset=mnist", "data.num_clients=6000"], "data.num_clients: MNIST's 10,000 test images"),
    (["model=3nn"], "model: '3nn' is not linear, cnn, 2nn or module:function"),
])
def test_bad_new_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as raised:
        config_lib.load(None, overrides)
    assert message in str(raised.value) and "\n" not in str(raised.value)


# --- 6. Rounds to target --------------------------------------------------------------------------

def record(round_num: int, centralized: float | None = None, test: float | None = None) -> RoundRecord:
    evaluation = {}
    if centralized is not None:
        evaluation["centralized"] = {"loss": 1.0 - centralized, "sparse_categorical_accuracy": centralized}
    if test is not None:
        evaluation["test"] = {"loss": 1.0 - test, "sparse_categorical_accuracy": test}
    return RoundRecord(round_num, train={"loss": 1.0, "sparse_categorical_accuracy": 0.5}, eval=evaluation or None)


@pytest.mark.unit
def test_rounds_to_target_interpolates_the_best_accuracy_so_far():
    points = [(1, 0.50), (2, 0.80), (3, 0.70), (4, 1.00)]
    assert targets.best_so_far(points) == [(1, 0.5), (2, 0.8), (3, 0.8), (4, 1.0)]
    assert targets.rounds_to_target(points, 0.9) == pytest.approx(3.5)  # between 0.8 (round 3) and 1.0
    assert targets.rounds_to_target(points, 0.8) == 2.0
    assert targets.rounds_to_target(points, 0.4) == 1.0  # reached at the first evaluation
    assert targets.rounds_to_target(points, 1.0) == 4.0
    assert targets.rounds_to_target([(1, 0.5), (2, 0.6)], 0.99) is None
    assert targets.rounds_to_target([(5, 0.5), (10, 0.7)], 0.6) == pytest.approx(7.5)  # sparse evaluation


@pytest.mark.unit
def test_rounds_to_target_uses_centralized_evaluation_when_logged_else_federated_test():
    both = [record(1, centralized=0.96, test=0.5), record(2, centralized=0.98), record(3, centralized=0.97, test=0.99)]
    summary = targets.summarize(both, [0.97, 0.99])
    assert summary["evaluation"] == "centralized" and summary["rounds"] == 3
    assert summary["targets"] == {"0.97": pytest.approx(1.5), "0.99": None}
    assert summary["best_accuracy"] == 0.98
    federated = targets.summarize([record(1, test=0.9), record(2), record(3, test=0.99)], [0.97])
    assert federated["evaluation"] == "test" and federated["targets"] == {"0.97": pytest.approx(1 + 0.07 / 0.09 * 2)}
    assert targets.summarize([record(1)], [0.97])["evaluation"] is None
    assert targets.describe(None, 50) == "not reached in 50 rounds" and targets.describe(19.44, 50) == "19.4"


def write_run(run_dir: Path, records: list[RoundRecord], config: dict) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


@pytest.mark.unit
def test_report_gives_rounds_to_target(tmp_path, capsys):
    curve = [0.9, 0.95, 0.975, 0.985, 0.98, 0.992]
    fast = write_run(tmp_path / "fast", [record(i + 1, centralized=a) for i, a in enumerate(curve)],
                     {"rounds": 6, "model": "cnn", "data": {"dataset": "mnist"}, "accuracy_targets": [0.97, 0.99]})
    slow = write_run(tmp_path / "slow", [record(1, test=0.5), record(2, test=0.96)],
                     {"rounds": 4, "model": "2nn", "data": {"dataset": "mnist"}})
    assert report.main([str(fast), str(slow), "--output", str(tmp_path / "report.png")]) == 0
    out = capsys.readouterr().out
    table = out.split("rounds to reach each target test accuracy")[1].splitlines()
    fast_row = next(line for line in table if line.startswith("fast "))
    slow_row = next(line for line in table if line.startswith("slow "))
    assert fast_row.split()[:4] == ["fast", "centralized", "evaluation", "0.9920"]
    # Best so far 0.95 (round 2) -> 0.975 (round 3) crosses 0.97 at 2.8; 0.985 (rounds 4 and 5) -> 0.992
    # (round 6) crosses 0.99 at 5 + 0.005 / 0.007.
    assert fast_row.split()[4:] == ["2.8", "5.7"]
    # slow's config sets no targets: it is measured against fast's, to compare them.
    assert "not reached in 2 rounds" in slow_row and slow_row.split()[1:6] == ["evaluation", "on", "test", "data",
                                                                              "0.9600"]
    assert (tmp_path / "report.png").stat().st_size > 0
    assert report.main([str(fast), "--target", "0.98", "--output", str(tmp_path / "other.png")]) == 0
    assert "rounds to 0.98" in capsys.readouterr().out
    assert report.main([str(fast), "--target", "1.5", "--output", str(tmp_path / "bad.png")]) == 2
    assert "--target 1.5" in capsys.readouterr().err
    # No run sets targets (the tutorial's default): no rounds-to-target table, no "not reached".
    assert report.main([str(slow), "--output", str(tmp_path / "plain.png")]) == 0
    out = capsys.readouterr().out
    assert "rounds to" not in out and "not reached" not in out
    assert targets.describe(None, 1) == "not reached in 1 round"


# --- 7. The configs -------------------------------------------------------------------------------

REQUIRED_ROWS = ["cnn-fedsgd-iid", "cnn-fedsgd-noniid", "cnn-fedavg-e5-b10-iid", "cnn-fedavg-e5-b10-noniid",
                 "2nn-fedsgd-iid", "2nn-fedavg-e1-b10-iid"]


@pytest.mark.unit
def test_the_required_rows_are_shipped():
    assert set(REQUIRED_ROWS) <= {path.stem for path in CONFIGS.glob("*.yaml")}


@pytest.mark.unit
@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_paper_config_is_valid_and_the_papers_setting(path):
    config = config_lib.load(path)
    model, algorithm, *rest = path.stem.split("-")
    assert config.model == model and config.data.dataset == "mnist" and config.data.num_clients == 100
    assert (config.clients_per_round, config.client_selection) == (10, "uniform")  # C = 0.1
    assert config.data.partition == ("iid" if rest[-1] == "iid" else "shards")
    assert config.centralized_eval_every == 1 and config.accuracy_targets == [0.97, 0.99]
    if algorithm == "fedsgd":
        assert (config.preprocess.epochs, config.preprocess.batch_size) == (1, 0)
    else:
        epochs, batch = rest[0], rest[1]
        assert (f"e{config.preprocess.epochs}", f"b{config.preprocess.batch_size}") == (epochs, batch)
    assert config.server_optimizer.learning_rate == 1.0 and config.client_optimizer.name == "sgd"
    assert config.name == f"mcmahan2017-{path.stem}"


# --- 3, 5: centralized evaluation and FedSGD in real runs, on both client-input paths ---------------

def fedsgd_run(directory: Path, client_input: str) -> Path:
    write_fake_mnist(directory / "data", train=200, test=50)
    config = config_lib.load(CONFIGS / "2nn-fedsgd-iid.yaml", [
        f"data.cache_dir={directory / 'data'}", "data.allow_download=false", "data.num_clients=10",
        "clients_per_round=4", "rounds=3", "eval_every=2", "centralized_eval_every=1", "checkpoint_every=1",
        f"client_input={client_input}"])
    run_dir = directory / client_input
    quiet_train(config, run_dir)
    return run_dir


def test_fedsgd_and_centralized_evaluation_on_both_client_input_paths(tmp_path):
    runs = {name: fedsgd_run(tmp_path, name) for name in ("prepared", "datasets")}
    rows = {name: metrics_rows(run_dir) for name, run_dir in runs.items()}
    for row_a, row_b in zip(rows["prepared"], rows["datasets"]):
        assert row_a["clients"] == row_b["clients"]
        assert row_a["train"]["num_batches"] == 4  # B = inf: one batch per client
        for key in ("loss", "sparse_categorical_accuracy", "num_examples"):
            assert row_a["train"][key] == pytest.approx(row_b["train"][key], abs=1e-6)
        assert row_a["eval"]["centralized"] == pytest.approx(row_b["eval"]["centralized"], abs=1e-6)
    prepared = rows["prepared"]
    # Centralized every round; federated every 2 rounds and after the last.
    assert [sorted(row["eval"]) for row in prepared] == [["centralized"], ["centralized", "test", "train"],
                                                          ["centralized", "test", "train"]]
    assert all(row["eval"]["centralized"]["num_examples"] == 50 for row in prepared)
    # All clients' test data are the whole test set: federated and centralized evaluation agree.
    assert prepared[-1]["eval"]["centralized"]["sparse_categorical_accuracy"] == pytest.approx(
        prepared[-1]["eval"]["test"]["sparse_categorical_accuracy"], abs=1e-6)
    assert prepared[-1]["eval"]["centralized"]["loss"] == pytest.approx(prepared[-1]["eval"]["test"]["loss"], rel=1e-4)
    logged = scalars(runs["prepared"])
    assert [step for step, _ in logged["accuracy/centralized_evaluation"]] == [1, 2, 3]
    summary = json.loads((runs["prepared"] / "summary.json").read_text())
    reached = summary["rounds_to_target"]
    assert reached["evaluation"] == "centralized_evaluation" and reached["rounds"] == 3
    assert set(reached["targets"]) == {"0.97", "0.99"}
    assert summary["centralized_evaluation"] == prepared[-1]["eval"]["centralized"]


# --- 8. The notebook ------------------------------------------------------------------------------

def run_notebook(directory: Path):
    write_fake_mnist(directory / "data", train=400, test=200)
    # Two of its four rows (FedSGD IID, FedAvg non-IID) cover both algorithms and both partitions.
    return execute_notebook(NOTEBOOK, {"ROUNDS": 2, "MNIST_DIR": str(directory / "data"), "ROWS": ROWS},
                            cwd=NOTEBOOK.parent)


ROWS = ["cnn-fedsgd-iid", "cnn-fedavg-e5-b10-noniid"]


BACKGROUND = {"executed": Background(run_notebook, "fedavg_paper")}


@pytest.fixture
def executed(tmp_path_factory):
    return BACKGROUND["executed"].result(tmp_path_factory)


def test_the_paper_notebook_runs_rows_and_plots_accuracy_with_the_targets(executed):
    text = "".join(json.loads(t).get("text", "") for t in outputs_text(executed))
    assert "the cached mnist.npz: 400 training and 200 test images" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("row "))
    assert "rounds to 0.97" in lines[header] and "paper" in lines[header]
    table = lines[header + 1:header + 1 + len(ROWS)]
    assert [line.split()[0] for line in table] == ROWS
    for line in table:
        assert 0.0 <= float(line.split()[2]) <= 1.0
        assert line.count("not reached in 2 rounds") + line.count(".") >= 3  # each target: reached or not
    assert [line.split()[-1] for line in table] == ["626", "229"]  # the paper's Table 2
    images = [o for c in executed.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 1
    assert machine_paths_in(executed) == []


@pytest.mark.unit
def test_the_committed_notebook_is_executed_small_and_path_free():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert NOTEBOOK.stat().st_size < 400_000
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.outputs)
    assert machine_paths_in(notebook) == []
