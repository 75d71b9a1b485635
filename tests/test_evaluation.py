"""Evaluations (fedmnist.evaluation): federated evaluation built when first needed, in the round that first
runs it and never before round 1, and the centralized evaluation's Keras model kept valid around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import metrics_rows, small_config


class FakeFederated:
    """The part of FederatedEvaluator that Evaluations drives, recording what it is asked."""

    def __init__(self):
        self.calls: list[str] = []
        self.built = False
        self.data = {"train": ["a"], "test": ["b"]}

    def ready(self):
        self.calls.append("ready")
        built_now, self.built = not self.built, True
        return built_now

    def __call__(self, weights, data):
        self.calls.append(f"evaluate {data[0]}")
        return {"loss": 1.0}


class FakeCentralized:
    def __init__(self):
        self.calls: list[str] = []

    def forget_model(self):
        self.calls.append("forget")

    def __call__(self, weights):
        self.calls.append("evaluate")
        return {"loss": 2.0}


@pytest.mark.unit
def test_federated_evaluation_is_built_in_the_first_round_that_runs_it_and_not_before():
    # Not in a background thread during the round before: see FederatedEvaluator (AutoGraph in two threads).
    from fedmnist.evaluation import Evaluations

    federated = FakeFederated()
    evaluations = Evaluations(federated, every=0, last_round=5)
    for round_num in (1, 2, 3, 4):
        assert evaluations(round_num, None) is None and federated.calls == []
    assert evaluations(5, None) == {"train": {"loss": 1.0}, "test": {"loss": 1.0}}
    assert federated.calls == ["ready", "evaluate a", "evaluate b"]
    federated = FakeFederated()
    evaluations = Evaluations(federated, every=3, last_round=7)
    evaluations(1, None)
    evaluations(2, None)
    assert federated.calls == []
    evaluations(3, None)
    assert federated.calls[0] == "ready"
    for every, last_round in ((1, 5), (0, 1)):
        federated = FakeFederated()
        assert set(Evaluations(federated, every=every, last_round=last_round)(1, None)) == {"train", "test"}
        assert federated.calls[0] == "ready"


@pytest.mark.unit
def test_the_centralized_keras_model_is_built_again_after_the_federated_evaluation_is_built():
    # Building it builds Keras models in graphs, which invalidates eager ones.
    from fedmnist.evaluation import Evaluations

    federated, centralized = FakeFederated(), FakeCentralized()
    evaluations = Evaluations(federated, every=2, last_round=4, centralized=centralized, centralized_every=1)
    assert evaluations(1, None) == {"centralized": {"loss": 2.0}}
    assert set(evaluations(2, None)) == {"train", "test", "centralized"}
    assert centralized.calls == ["evaluate", "forget", "evaluate"]
    evaluations(3, None)
    evaluations(4, None)
    assert centralized.calls[3:] == ["evaluate", "evaluate"]     # nothing built since: the model is kept


def test_a_federated_evaluator_builds_once_when_first_ready(tff_runtime):
    from fedmnist.evaluation import FederatedEvaluator
    from fedmnist.model import build_model_fn

    made = []
    evaluator = FederatedEvaluator(build_model_fn(), data=lambda: made.append(1) or {"train": []})
    assert evaluator.process is None and made == []
    assert evaluator.ready() is True and evaluator.ready() is False
    assert made == [1] and evaluator.process is not None and evaluator.data == {"train": []}


def run_with(run_dir, *overrides):
    """A 3-round run in this process; its metrics rows, and at each round whether the federated
    evaluation was built (0: once the experiment is built)."""
    from fedmnist import experiment, loop

    config = small_config("rounds=3", *overrides)
    seen = {}
    run_dir.mkdir()
    with experiment.build(config, run_dir, echo=lambda line: None) as built:
        federated = built.evaluations.federated
        seen[0] = federated.process is not None

        def round_done(record):
            seen[record.round] = federated.process is not None

        loop.run(built, loop.Hooks(round_done=round_done))
    return metrics_rows(run_dir), seen


def test_lazy_federated_evaluation_keeps_centralized_runs_and_their_numbers(tmp_path):
    """`centralized_eval_every=1` with federated evaluation only after the last round (built then, after the
    centralized evaluation's Keras model was in use) and with it every round (built in round 1): the same
    numbers; and no federated evaluation built before the round that runs it."""
    lazy, seen = run_with(tmp_path / "lazy", "centralized_eval_every=1", "eval_every=0")
    assert seen == {0: False, 1: False, 2: False, 3: True}
    every, seen_every = run_with(tmp_path / "every", "centralized_eval_every=1", "eval_every=1")
    assert seen_every[0] is False and seen_every[1] is True
    assert [sorted(r["eval"]) for r in lazy] == [["centralized"]] * 2 + [["centralized", "test", "train"]]
    assert all(sorted(r["eval"]) == ["centralized", "test", "train"] for r in every)
    for a, b in zip(lazy, every):
        assert a["train"] == pytest.approx(b["train"], abs=1e-6)
        assert a["eval"]["centralized"] == pytest.approx(b["eval"]["centralized"], abs=1e-6)
    for split in ("train", "test", "centralized"):
        assert lazy[-1]["eval"][split] == pytest.approx(every[-1]["eval"][split], abs=1e-6)


@pytest.mark.parametrize("batch_size", [7, 0])
def test_prepared_federated_evaluation_equals_tffs_build_fed_eval(tff_runtime, tmp_path, batch_size):
    """The prepared evaluation (`client_input: prepared`) gives `build_fed_eval`'s metrics on the article's
    one-epoch pipelines for the same weights, bit for bit (the same batches in the same order): a Keras model
    and the hand-written `VariableModel`, random weights, clients of several sizes (padded to size classes) and
    one without examples, sent in one group, one client per group, or groups of several, or read by the
    worker from files (as local workers do)."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedmnist import custom_model, data
    from fedmnist.client_tensors import PreparedClients
    from fedmnist.data.preprocessing import Preprocessing
    from fedmnist.evaluation import FederatedEvaluator, PreparedFederatedEvaluator, PreparedSplit
    from fedmnist.model import build_model_fn

    rng = np.random.default_rng(3)
    sizes = (0, 5, 23, 40, 3, 17)
    clients = {f"c{i}": (rng.uniform(size=(n, 28, 28)).astype(np.float32), rng.integers(0, 10, n))
               for i, n in enumerate(sizes)}
    client_data = data.client_data_from_arrays(clients)
    ids = list(clients)
    settings = Preprocessing(epochs=1, batch_size=batch_size, shuffle_buffer=10, prefetch_buffer=2, shuffle_seed=4,
                             per_round=False)
    weights = tff.learning.models.ModelWeights(
        trainable=[rng.normal(0, 0.05, (784, 10)).astype(np.float32), rng.normal(0, 0.1, 10).astype(np.float32)],
        non_trainable=[])
    for model_fn, files in ((build_model_fn(), tmp_path / "keras"), (custom_model.MnistModel, tmp_path / "custom")):
        files.mkdir()
        tf.keras.utils.set_random_seed(1)
        article = FederatedEvaluator(model_fn)(
            weights, [settings.pipeline(client_data.create_tf_dataset_for_client(c)) for c in ids])
        assert article["num_examples"] == sum(sizes)
        accuracy = article.get("sparse_categorical_accuracy", article.get("accuracy"))  # Keras's name, or the model's
        assert 0.02 < accuracy < 0.5 and article["loss"] != pytest.approx(np.log(10))  # not the zero model's
        if "num_batches" in article:
            assert article["num_batches"] == sum(-(-n // (batch_size or n)) for n in sizes if n)
        for group_bytes, files_dir in ((2**30, None), (1, None), (100_000, None), (100_000, files)):
            tf.keras.utils.set_random_seed(1)
            prepared = PreparedFederatedEvaluator(model_fn, batch_size, group_bytes=group_bytes,
                                                  read_files=files_dir is not None)
            result = prepared(weights, PreparedSplit(PreparedClients(client_data, settings, files_dir=files_dir), ids))
            assert result == article, (model_fn, group_bytes, files_dir)
        assert len(list(files.iterdir())) == 2 * len(ids)   # the evaluation read files: x and y of each client


@pytest.mark.unit
def test_the_files_of_clients_evicted_for_a_group_go_when_the_next_group_is_asked_for(tmp_path):
    # An evaluation larger than the cache reads its clients group by group; the files of clients evicted
    # while a group is made belong to groups already evaluated, so they go before the next group is made.
    import numpy as np

    from fedmnist import data
    from fedmnist.client_tensors import PreparedClients
    from fedmnist.data.preprocessing import Preprocessing

    clients = {f"c{i}": (np.zeros((4, 28, 28), np.float32), np.zeros(4, np.int64)) for i in range(6)}
    client_data = data.client_data_from_arrays(clients)
    one = PreparedClients(client_data, Preprocessing(epochs=1, per_round=False))._client("c0").nbytes
    prepared = PreparedClients(client_data, Preprocessing(epochs=1, per_round=False), max_bytes=2 * one,
                               files_dir=tmp_path)
    seen = []
    for group in prepared.groups(list(clients), max_bytes=2 * one):
        paths = [d.get_single_element()["x"].numpy().decode() for d in group]
        assert all(Path(path).exists() for path in paths)   # the group being evaluated is on disk
        assert len(list(tmp_path.iterdir())) <= 2 * 2 * 2   # with, at most, the group before it
        seen.append(paths)
    assert len(seen) == 3 and not any(Path(path).exists() for path in seen[0])


@pytest.mark.unit
def test_prepared_client_groups_hold_at_most_the_byte_budget():
    import numpy as np

    from fedmnist import data
    from fedmnist.client_tensors import PreparedClients
    from fedmnist.data.preprocessing import Preprocessing

    clients = {f"c{i}": (np.zeros((n, 28, 28), np.float32), np.zeros(n, np.int64)) for i, n in enumerate((4, 4, 8, 4))}
    prepared = PreparedClients(data.client_data_from_arrays(clients), Preprocessing(epochs=1, per_round=False))
    one = prepared._client("c0").nbytes
    groups = list(prepared.groups(list(clients), max_bytes=2 * one))
    assert [len(g) for g in groups] == [2, 1, 1]      # c2 is larger than two of the others: a group of its own
    assert [len(g) for g in prepared.groups(list(clients), max_bytes=1)] == [1, 1, 1, 1]
    assert [len(g) for g in prepared.groups(list(clients), max_bytes=2**30)] == [4]
