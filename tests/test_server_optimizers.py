"""The ready configs of Reddi et al. 2021 train: each improves over 20 rounds on offline data."""

from pathlib import Path

import pytest

from fedmnist import config as config_lib
from fedmnist.outputs.metrics_log import MetricsLog
from helpers import quiet_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizer_improves_over_20_rounds(tmp_path, name):
    # The paper's optimizer settings, on the linear model and offline digits to keep the test short.
    config = config_lib.load(CONFIGS / f"{name}.yaml", [
        "model=linear", "rounds=20", "eval_every=0", "eval_clients=0", "data.dataset=digits",
        "clients_per_round=5"])
    assert config.server_optimizer.name in {"sgd", "adam", "yogi", "adagrad"}
    quiet_train(config, tmp_path)
    rows = MetricsLog(tmp_path).rows()
    first, last = rows[0]["train"], rows[-1]["train"]
    assert last["loss"] < 0.9 * first["loss"], (first, last)
    assert last["sparse_categorical_accuracy"] > first["sparse_categorical_accuracy"] + 0.04
    assert rows[-1]["eval"]["test"]["sparse_categorical_accuracy"] > 0.15  # chance is 0.1
