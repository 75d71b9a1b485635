"""The round loop in-process: what it leaves behind and what it refuses."""

import pytest

from fedmnist import config as config_lib
from fedmnist import loop, runtime


def synthetic_config(*overrides):
    return config_lib.load(None, ["data.dataset=synthetic", "data.num_clients=6", "clients_per_round=3",
                                  "rounds=2", "preprocess.epochs=1", *overrides])


def test_in_process_run_stops_its_worker(tmp_path):
    before = runtime.worker_children()  # other tests' session-wide workers may be running
    summary = loop.train(synthetic_config(), tmp_path, echo=lambda line: None, progress=False)
    assert summary["rounds"] == 2 and 0.0 <= summary["eval"]["test"]["sparse_categorical_accuracy"] <= 1.0
    assert runtime.worker_children() == before




def test_divergence_stops_with_a_clear_error(tmp_path):
    config = synthetic_config("client_optimizer.learning_rate=1e30", "server_optimizer.learning_rate=1e30")
    before = runtime.worker_children()
    with pytest.raises(loop.TrainingDivergedError, match="diverged at round"):
        loop.train(config, tmp_path, echo=lambda line: None, progress=False)
    assert runtime.worker_children() == before
