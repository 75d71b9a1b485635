"""Prepared client tensors (fedmnist.client_tensors): the same batches and metrics as the article's
tf.data path, padded to a few size classes, cached within a byte budget, one dataset kernel."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from fedmnist import client_tensors, data
from fedmnist.data.preprocessing import Preprocessing
from fedmnist.experiment import prepared_clients, preprocessing_settings
from fedmnist.data import sources
from helpers import assert_same_rounds, small_config, small_run


@pytest.mark.unit
def test_shuffle_order_reproduces_the_articles_batches():
    dataset = data.load_synthetic(num_clients=2, examples_per_client=37, seed=5)
    client = dataset.train.create_tf_dataset_for_client(dataset.train.client_ids[0])
    settings = Preprocessing(epochs=3, batch_size=7, shuffle_buffer=10, prefetch_buffer=2, shuffle_seed=4,
                             per_round=False)
    tf.keras.utils.set_random_seed(11)
    article = list(data.preprocess(client, epochs=3, batch_size=7, shuffle_buffer=10, prefetch_buffer=2, seed=4))
    tf.keras.utils.set_random_seed(11)
    prepared = client_tensors.PreparedClients(dataset.train, settings).dataset(dataset.train.client_ids[0])
    arrays = {key: value.numpy() for key, value in prepared.get_single_element().items()}
    order, n = arrays["order"], len(list(client))
    assert len(order) == 3 * n and order.max() == n - 1
    # Rows past the examples are padding to a size class: zeros that no batch reads.
    assert len(arrays["x"]) == len(arrays["y"]) == client_tensors.padded_rows(n) > n
    assert not arrays["x"][n:].any() and not arrays["y"][n:].any()
    batches = [order[i:i + 7] for i in range(0, len(order), 7)]
    assert len(batches) == len(article)
    for indices, batch in zip(batches, article):
        np.testing.assert_array_equal(arrays["x"][indices], batch["x"].numpy())
        np.testing.assert_array_equal(arrays["y"][indices], batch["y"].numpy())


@pytest.mark.unit
def test_size_classes_are_few_and_pad_at_most_half():
    sizes = range(1, 1025)
    rows = [client_tensors.padded_rows(n) for n in sizes]
    assert all(n <= r <= 1.5 * n for n, r in zip(sizes, rows))
    assert rows == sorted(rows)
    # 1 to 3 rows are classes of their own, then two per doubling from 4 to 1,024.
    assert len(set(rows)) == 3 + 2 * 8 + 1


@pytest.mark.unit
def test_sampled_clients_are_padded_to_size_classes_fixed_ones_are_not():
    dataset = data.load_synthetic(num_clients=2, examples_per_client=37, seed=5)
    client_id = dataset.train.client_ids[0]
    n = len(list(dataset.train.create_tf_dataset_for_client(client_id)))
    assert client_tensors.padded_rows(n) > n
    for selection, rows in (("uniform", client_tensors.padded_rows(n)), ("fixed", n)):
        config = small_config(f"client_selection={selection}")
        clients = prepared_clients(config, dataset.train)
        assert len(clients.dataset(client_id).get_single_element()["x"]) == rows


@pytest.mark.unit
def test_cache_stays_within_its_byte_budget():
    dataset = data.load_synthetic(num_clients=6, examples_per_client=20, seed=1)
    settings = preprocessing_settings(small_config().preprocess)
    one_client = client_tensors.PreparedClients(dataset.train, settings).dataset(dataset.train.client_ids[0])
    size = sum(t.numpy().nbytes for t in one_client.get_single_element().values())
    clients = client_tensors.PreparedClients(dataset.train, settings, max_bytes=int(2.5 * size))
    first = clients(dataset.train.client_ids[:1])[0].get_single_element()
    clients(dataset.train.client_ids)
    assert clients.cached_bytes <= 2.5 * size
    again = clients(dataset.train.client_ids[:1])[0].get_single_element()   # evicted, prepared anew
    for key in ("x", "y", "order"):
        np.testing.assert_array_equal(first[key].numpy(), again[key].numpy())


@pytest.mark.unit
def test_clients_of_any_size_share_one_dataset_kernel():
    # One traced function for every client size: TensorFlow keeps no per-size kernels, so memory
    # stays flat however many client sizes a long run samples (bench's `scale` workload).
    clients = {f"c{n}": (np.random.default_rng(n).uniform(size=(n, 28, 28)), np.arange(n) % 10)
               for n in (3, 17, 40)}
    client_data = data.client_data_from_arrays(clients)
    traces_before = (sources.examples_dataset.experimental_get_tracing_count(),
                     client_tensors.as_dataset.experimental_get_tracing_count())
    cache = client_tensors.PreparedClients(client_data, preprocessing_settings(small_config().preprocess))
    for dataset, (client_id, (pixels, _)) in zip(cache(list(clients)), clients.items()):
        assert dataset.element_spec == client_tensors.PREPARED_SPEC
        x = dataset.get_single_element()["x"].numpy()
        assert len(x) == client_tensors.padded_rows(len(pixels))
        np.testing.assert_array_equal(x[:len(pixels)], pixels.reshape(-1, 784).astype(np.float32))
    traces_after = (sources.examples_dataset.experimental_get_tracing_count(),
                    client_tensors.as_dataset.experimental_get_tracing_count())
    assert all(after - before <= 1 for before, after in zip(traces_before, traces_after))


def test_prepared_rounds_equal_the_articles_path(prepared_run, tmp_path):
    # SMALL samples clients, so their prepared tensors carry padding rows.
    train_data = data.load_dataset(small_config().data, 3).train
    sizes = [len(list(train_data.create_tf_dataset_for_client(c))) for c in train_data.client_ids]
    assert any(client_tensors.padded_rows(n) > n for n in sizes)
    article = small_run(small_config("client_input=datasets"), tmp_path)
    assert_same_rounds(prepared_run, article, tolerance=1e-6)
    assert prepared_run[-1]["train"]["loss"] < prepared_run[0]["train"]["loss"]
    # The final federated evaluation (prepared tensors against `build_fed_eval` on the article's datasets):
    # the same batches in the same order, so bit for bit; with SMALL's per-round shuffling, evaluation visits
    # each client in the order of the article's evaluation datasets (`preprocess.shuffle_seed`), not a round's.
    assert prepared_run[-1]["eval"] == article[-1]["eval"]


@pytest.mark.unit
def test_runs_on_prepared_tensors_evaluate_on_them():
    from fedmnist import experiment
    from fedmnist.evaluation import FederatedEvaluator, PreparedFederatedEvaluator

    dataset = data.load_dataset(small_config().data, 3)
    for client_input, kind in (("prepared", PreparedFederatedEvaluator), ("datasets", FederatedEvaluator)):
        config = small_config(f"client_input={client_input}")
        evaluations = experiment.evaluations(config, None, dataset, ["a"], preprocessing_settings(config.preprocess))
        assert type(evaluations.federated) is kind


@pytest.mark.unit
def test_each_round_shuffles_anew_and_reproducibly():
    dataset = data.load_synthetic(num_clients=2, examples_per_client=30, seed=5)
    client_id = dataset.train.client_ids[0]
    client = dataset.train.create_tf_dataset_for_client(client_id)
    config = small_config("preprocess.epochs=2", "preprocess.batch_size=4")
    settings = preprocessing_settings(config.preprocess)

    def orders(clients):
        tf.keras.utils.set_random_seed(config.seed)
        return [clients.dataset(client_id, r).get_single_element()["order"].numpy() for r in (1, 2, 3, 2)]

    per_round = orders(client_tensors.PreparedClients(dataset.train, settings))
    assert all(sorted(o) == sorted(per_round[0]) for o in per_round)       # the same examples, twice each
    assert not np.array_equal(per_round[0], per_round[1]) and not np.array_equal(per_round[1], per_round[2])
    np.testing.assert_array_equal(per_round[1], per_round[3])              # a round replayed: its order
    np.testing.assert_array_equal(per_round, orders(client_tensors.PreparedClients(dataset.train, settings)))
    # Each round's order is the one the article's pipeline, built for that round, visits.
    for round_num, order in zip((1, 2, 3), per_round):
        tf.keras.utils.set_random_seed(config.seed)
        (pipeline,) = data.make_round_data(dataset.train, [client_id], round_num, settings)
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        x = client_tensors.prepare_examples(client, size_classes=False)[0]
        for indices, batch in zip(batches, pipeline, strict=True):
            np.testing.assert_array_equal(x[indices], batch["x"].numpy())
    fixed = small_config("preprocess.epochs=2", "preprocess.shuffle=fixed")
    same = orders(client_tensors.PreparedClients(dataset.train, preprocessing_settings(fixed.preprocess)))
    assert all(np.array_equal(o, same[0]) for o in same)


@pytest.mark.unit
def test_a_prefetched_round_is_the_round_prepared_when_asked_and_is_not_prepared_again(monkeypatch):
    dataset = data.load_synthetic(num_clients=5, examples_per_client=30, seed=5)
    ids = dataset.train.client_ids
    settings = preprocessing_settings(small_config("preprocess.epochs=2").preprocess)

    def contents(inputs):
        return [{k: v.numpy() for k, v in d.get_single_element().items()} for d in inputs]

    tf.keras.utils.set_random_seed(3)
    asked = client_tensors.PreparedClients(dataset.train, settings)
    expected = [contents(asked(ids[:3], 1)), contents(asked(ids[1:], 2))]

    tf.keras.utils.set_random_seed(3)
    clients = client_tensors.PreparedClients(dataset.train, settings)
    round_1 = clients(ids[:3], 1)
    clients.prefetch(ids[1:], 2)     # while round 1 would train
    clients.wait_for_prefetch()
    prepared = []
    for name in ("shuffle_order", "read_examples"):
        real = getattr(client_tensors, name)
        monkeypatch.setattr(client_tensors, name, lambda *args, real=real, **kwargs: prepared.append(args)
                            or real(*args, **kwargs))
    round_2 = clients(ids[1:], 2)
    assert prepared == []   # ready: nothing read or ordered again
    for got, want in zip([contents(round_1), contents(round_2)], expected):
        for a, b in zip(got, want, strict=True):
            for key in ("x", "y", "order"):
                np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.unit
def test_a_round_whose_clients_orders_together_exceed_the_memory_is_refused_though_each_one_fits(monkeypatch):
    from fedmnist import machine
    from fedmnist.errors import PlanTooLargeError

    dataset = data.load_synthetic(num_clients=5, examples_per_client=30, seed=5)
    ids, epochs = dataset.train.client_ids, 1000
    settings = preprocessing_settings(small_config(f"preprocess.epochs={epochs}").preprocess)
    size = len(list(dataset.train.create_tf_dataset_for_client(ids[0])))   # every client's
    # One client's order, held as int32 `ORDER_COPIES` times and built as int64 first, takes half the memory;
    # with a second one's it still fits; a third one's does not.
    one_client = (4 * client_tensors.ORDER_COPIES + 8) * size * epochs
    monkeypatch.setattr(machine, "memory_bytes", lambda: 2 * one_client)
    clients = client_tensors.PreparedClients(dataset.train, settings)
    assert len(clients(ids[:2], 1)) == 2
    with pytest.raises(PlanTooLargeError, match=f"preprocess.epochs: 1,000 epochs of a round's {3 * size} examples"):
        clients(ids, 1)
    clients.prefetch(ids, 2)   # refused there too: the round meets the error when it asks
    clients.wait_for_prefetch()
    with pytest.raises(PlanTooLargeError):
        clients(ids, 2)


@pytest.mark.unit
def test_clients_for_local_workers_are_files_the_worker_reads_back_as_the_tensors_it_was_sent(tmp_path):
    dataset = data.load_synthetic(num_clients=4, examples_per_client=30, seed=2)
    ids = dataset.train.client_ids
    settings = preprocessing_settings(small_config("preprocess.epochs=2").preprocess)
    tf.keras.utils.set_random_seed(4)
    sent = [d.get_single_element() for d in client_tensors.PreparedClients(dataset.train, settings)(ids, 3)]
    tf.keras.utils.set_random_seed(4)
    files = client_tensors.PreparedClients(dataset.train, settings, files_dir=tmp_path)(ids, 3)
    for tensors, named in zip(sent, files, strict=True):
        element = named.get_single_element()
        assert element["x"].dtype == tf.string and Path(element["x"].numpy().decode()).parent == tmp_path
        read = client_tensors.read_prepared(element)   # what the client work does in the worker
        for key in ("x", "y", "order"):
            np.testing.assert_array_equal(read[key].numpy(), tensors[key].numpy())
    assert len(list(tmp_path.iterdir())) == 2 * len(ids)


@pytest.mark.unit
def test_an_evicted_clients_files_go_only_when_the_next_round_is_asked_for(tmp_path):
    # A prefetch evicts clients while the worker may still read the round it trains: their files stay until
    # the loop asks for the next round, which it does only when that round is over.
    dataset = data.load_synthetic(num_clients=6, examples_per_client=20, seed=1)
    ids = dataset.train.client_ids
    settings = preprocessing_settings(small_config().preprocess)
    one = client_tensors.PreparedClients(dataset.train, settings)
    size = sum(t.numpy().nbytes for t in one.dataset(ids[0]).get_single_element().values())
    clients = client_tensors.PreparedClients(dataset.train, settings, max_bytes=int(2.5 * size), files_dir=tmp_path)
    round_1 = [d.get_single_element()["x"].numpy().decode() for d in clients(ids[:2], 1)]
    clients.prefetch(ids[2:4], 2)
    clients.wait_for_prefetch()
    assert all(Path(path).exists() for path in round_1)   # evicted, but round 1 may still be reading them
    clients(ids[2:4], 2)
    assert not Path(round_1[0]).exists() and len(list(tmp_path.iterdir())) == 2 * 2


@pytest.mark.unit
def test_a_client_that_fails_in_a_prefetch_fails_in_its_round_with_its_own_error():
    from fedmnist.errors import DataUnavailableError

    clients_arrays = {"good": (np.zeros((4, 28, 28)), np.arange(4)), "bad": (np.zeros((4, 28, 28)), np.full(4, 40))}
    clients = client_tensors.PreparedClients(data.client_data_from_arrays(clients_arrays),
                                             preprocessing_settings(small_config().preprocess), num_classes=10,
                                             origin="a test file")
    clients.prefetch(["bad", "good"], 2)   # raises nothing here
    clients.wait_for_prefetch()
    with pytest.raises(DataUnavailableError, match="client bad of a test file"):
        clients(["bad", "good"], 2)


@pytest.mark.unit
def test_the_clients_of_a_coming_round_are_known_ahead_unless_the_sample_is_secret():
    from fedmnist.clients.participation import Participation

    ids = [f"c{i}" for i in range(20)]
    config = small_config("clients_per_round=5", "client_selection=uniform", "availability.dropout=0.3")
    participation = Participation(config, ids)
    assert participation.upcoming(4) == participation.plan(4).completed != []
    assert Participation(config, ids, secret_rate=0.5).upcoming(4) == []
    skipping = Participation(small_config("clients_per_round=5", "availability.min_clients=5",
                                          "availability.dropout=0.9"), ids)
    assert skipping.plan(4).skipped and skipping.upcoming(4) == []


@pytest.mark.unit
def test_round_shuffle_seeds_depend_on_seed_round_and_client_only():
    seeds = {data.round_shuffle_seed(s, r, c) for s in (1, 2) for r in (1, 2) for c in ("a", "b")}
    assert len(seeds) == 8 and all(0 <= x < 2**63 for x in seeds)
    # A fixed value: a seed that changed between versions or processes (Python's salted hash()) would
    # change every run's shuffles and break resuming a run saved by another version.
    assert data.round_shuffle_seed(1, 2, "a") == 8434072511722816962
    # NumPy's int64, which TensorFlow does not cache as it does Python numbers; the same shuffle.
    seed = data.round_shuffle_seed(1, 2, "a")
    assert type(seed) is np.int64
    np.testing.assert_array_equal(client_tensors.shuffle_order(30, 2, 10, seed),
                                  client_tensors.shuffle_order(30, 2, 10, int(seed)))


@pytest.mark.unit
def test_clients_read_in_one_batch_or_in_batches_give_the_same_examples():
    # In-memory sources know their size and are read as one batch; others (EMNIST's SQL-backed datasets,
    # unknown size) batch by batch: the same rows either way.
    pixels = np.random.default_rng(2).uniform(size=(9, 28, 28)).astype(np.float32)
    known = data.client_data_from_arrays({"c": (pixels, np.arange(9) % 10)}).create_tf_dataset_for_client("c")
    unknown = known.filter(lambda example: True)
    assert int(known.cardinality()) == 9 and int(unknown.cardinality()) < 0
    for size_classes in (False, True):
        one, batched = (client_tensors.prepare_examples(d, size_classes) for d in (known, unknown))
        assert one[2] == batched[2] == 9
        for a, b in zip(one[:2], batched[:2]):
            np.testing.assert_array_equal(a, b)
    empty = known.take(0)
    x, y, n = client_tensors.prepare_examples(empty, size_classes=False)
    assert n == 0 and x.shape == (0, 784) and y.shape == (0, 1)


@pytest.mark.unit
def test_the_client_work_and_the_prepared_evaluation_are_traced_without_autograph():
    # Its loop is TensorFlow's own control flow; AutoGraph rewrote it (and, through it, what it calls) at every
    # build, for the same graph (docs/performance.md, "Start-up").
    import tensorflow_federated as tff
    from tensorflow.python.autograph.impl import api as autograph_api

    from fedmnist.model import build_model_fn

    converted, names = [], []
    transform = autograph_api.PyToTF.transform

    def recording(self, obj, user_context):  # called for every conversion, cached ones too
        converted.append(getattr(obj, "__module__", None))
        names.append(getattr(obj, "__qualname__", ""))
        return transform(self, obj, user_context)

    autograph_api.PyToTF.transform = recording
    try:
        for proximal_strength in (0.0, 0.1):
            client_tensors.build_prepared_client_work(build_model_fn(), tff.learning.optimizers.build_sgdm(0.02),
                                                      batch_size=20, proximal_strength=proximal_strength)
        client_tensors.build_prepared_fed_eval(build_model_fn(), batch_size=20)
    finally:
        autograph_api.PyToTF.transform = transform
    # TFF's own functions (its optimizer, model and metrics code) still are: the recording sees AutoGraph.
    assert converted, "nothing converted at all: the recording no longer sees AutoGraph"
    assert client_tensors.__name__ not in converted
    # Nor is the model's forward pass, which TFF's Keras model wraps in a tf.function of its own
    # (`client_tensors.untraced`): it cost about 0.8 s of a fresh run's build (docs/performance.md).
    assert not [name for name in names if "forward_pass" in name or "unfinalized_metrics" in name], names
    # Nor are the metric finalizers, which TFF's Keras model also makes `tf.function`s
    # (`client_tensors.unconverted_finalizers`): about a fifth of a warm run's CPU time.
    assert not [name for name in names if "finalizer" in name], names



def test_autograph_converts_none_of_the_packages_functions_reading_data_or_building_the_evaluation():
    # In a fresh interpreter: this session may have traced them already, and a traced function is not
    # converted again. TFF's federated evaluation calls `model_fn` inside functions AutoGraph converts.
    program = textwrap.dedent("""
        import numpy as np
        import tensorflow_federated as tff
        from tensorflow.python.autograph.impl import api
        from fedmnist import model
        from fedmnist.data import sources

        converted = []
        transform = api.PyToTF.transform
        api.PyToTF.transform = lambda self, obj, context: (converted.append(f"{obj.__module__}.{obj.__qualname__}"),
                                                          transform(self, obj, context))[1]
        data = sources.client_data_from_arrays({"a": (np.zeros((3, 28, 28)), np.arange(3))})
        print(len(list(data.create_tf_dataset_for_client("a"))))
        tff.learning.algorithms.build_fed_eval(model.build_model_fn("cnn", 10))
        print(sorted(set(converted)))
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    examples, converted = done.stdout.strip().split("\n")[-2:]
    assert examples == "3"
    assert converted.startswith("['tensorflow_federated."), converted  # TFF's own still are: the recording works
    assert "fedmnist" not in converted and "from_keras_model" not in converted, converted
