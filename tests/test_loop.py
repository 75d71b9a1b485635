"""The round loop in-process: what it trains, what it leaves behind and what it refuses."""

import pytest

from fedmnist import config as config_lib
from fedmnist import loop, runtime
from helpers import metrics_rows


def synthetic_config(*overrides):
    return config_lib.load(None, ["data.dataset=synthetic", "data.num_clients=6", "clients_per_round=3",
                                  "rounds=2", "preprocess.epochs=1", *overrides])


def test_in_process_run_trains_and_stops_its_worker(tmp_path):
    config = synthetic_config()
    before = runtime.worker_children()  # other tests' session-wide workers may be running
    summary = loop.train(config, tmp_path, echo=lambda line: None, progress=False)
    assert runtime.worker_children() == before
    rows = metrics_rows(tmp_path)
    assert summary["rounds"] == 2 and [row["round"] for row in rows] == [1, 2]
    # Every example of every selected client is trained on once a round (one epoch), and evaluation
    # covers all clients: the synthetic clients hold 50 examples each, a fifth of them for testing.
    per_client_test = round(config.data.examples_per_client * config.data.test_fraction)
    per_client_train = config.data.examples_per_client - per_client_test
    assert [row["train"]["num_examples"] for row in rows] == [config.clients_per_round * per_client_train] * 2
    assert summary["evaluation_on_training_data"]["num_examples"] == config.data.num_clients * per_client_train
    assert summary["evaluation_on_test_data"]["num_examples"] == config.data.num_clients * per_client_test
    # The model learns: round 1 trains from the initial weights, near chance (0.1); round 2 from the
    # averaged model, which must be clearly better, and so must the final evaluation.
    first, last = rows[0]["train"], rows[-1]["train"]
    assert last["loss"] < first["loss"] - 0.05, (first, last)
    assert last["sparse_categorical_accuracy"] > first["sparse_categorical_accuracy"] + 0.15, (first, last)
    assert summary["local_training"] == last
    assert summary["evaluation_on_test_data"]["sparse_categorical_accuracy"] > 0.35
    assert summary["evaluation_on_test_data"]["loss"] < first["loss"]




def test_divergence_stops_with_a_clear_error(tmp_path):
    config = synthetic_config("client_optimizer.learning_rate=1e30", "server_optimizer.learning_rate=1e30")
    before = runtime.worker_children()
    with pytest.raises(loop.TrainingDivergedError, match="diverged at round"):
        loop.train(config, tmp_path, echo=lambda line: None, progress=False)
    assert runtime.worker_children() == before
