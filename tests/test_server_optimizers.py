"""The ready configs of Reddi et al. 2021 train: each improves over 20 rounds on offline data, and the
server step each applies is the configured optimizer's."""

from pathlib import Path

import numpy as np
import pytest

from fedmnist import config as config_lib
from fedmnist.outputs.metrics_log import MetricsLog
from helpers import final_weights, quiet_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]
# The paper's optimizer settings, on the linear model and offline digits to keep the tests short.
SHORT = ["model=linear", "eval_every=0", "data.dataset=digits", "clients_per_round=5"]


def load(name: str, *overrides: str) -> config_lib.Config:
    return config_lib.load(CONFIGS / f"{name}.yaml", SHORT + list(overrides))


@pytest.mark.parametrize("name", NAMES)
def test_server_optimizer_improves_over_20_rounds(tmp_path, name):
    # A checkpoint (TFF's SavedModel) and histograms only after the last round: this test reads the metrics,
    # and saving every round was a large part of its runs' time (docs/testing.md).
    config = load(name, "rounds=20", "eval_clients=0", "checkpoint_every=20", "histogram_every=0")
    quiet_train(config, tmp_path)
    rows = MetricsLog(tmp_path).rows()
    # The server learning rate the training state holds, every round, is the configured one.
    assert [row["learning_rate"]["server"] for row in rows] == pytest.approx(
        [config.server_optimizer.learning_rate] * 20, rel=1e-6)
    first, last = rows[0]["train"], rows[-1]["train"]
    assert last["loss"] < 0.9 * first["loss"], (first, last)
    assert last["sparse_categorical_accuracy"] > first["sparse_categorical_accuracy"] + 0.04
    assert rows[-1]["eval"]["test"]["sparse_categorical_accuracy"] > 0.15  # chance is 0.1


def initial_trainable(config: config_lib.Config) -> list[np.ndarray]:
    from fedmnist.model import initial_weights

    return [np.asarray(w) for w in initial_weights(config.model, 10, config.seed).trainable]  # digits: 10 classes


def first_server_step(cfg: config_lib.OptimizerConfig, delta: np.ndarray) -> np.ndarray:
    """What the optimizer's first step adds to the weights, given the round's mean client update `delta`
    (TFF's server optimizers take the gradient -delta). Written from the update rules, with TFF's
    defaults for what the config leaves unset (initial preconditioners: Yogi 1e-6, Adagrad 0.1)."""
    g = -delta.astype(np.float64)
    if cfg.name == "sgd":  # with momentum too: the first step's accumulator is g itself
        return -cfg.learning_rate * g
    if cfg.name == "adam":  # m = (1 - b1) g, v = (1 - b2) g^2, lr_t = lr sqrt(1 - b2) / (1 - b1)
        return -cfg.learning_rate * np.sqrt(1 - cfg.beta_2) * g / (np.sqrt((1 - cfg.beta_2) * g ** 2) + cfg.epsilon)
    if cfg.name == "yogi":  # v = v0 + (1 - b2) sign(g^2 - v0) g^2
        v = 1e-6 + (1 - cfg.beta_2) * np.sign(g ** 2 - 1e-6) * g ** 2
        return -cfg.learning_rate * np.sqrt(1 - cfg.beta_2) * g / (np.sqrt(v) + cfg.epsilon)
    if cfg.name == "adagrad":  # v = v0 + g^2
        return -cfg.learning_rate * g / np.sqrt(0.1 + g ** 2 + cfg.epsilon)
    raise ValueError(cfg.name)


@pytest.fixture(scope="module")
def plain_fedavg_round(tmp_path_factory):
    """One round of the configs' client training with a server SGD step of 1 and no momentum: the new
    weights minus the initial ones are the round's mean client update."""
    config = load("fedavgm", "rounds=1", "eval_clients=1", "server_optimizer.learning_rate=1.0",
                  "server_optimizer.momentum=0")
    run_dir = tmp_path_factory.mktemp("plain-fedavg")
    quiet_train(config, run_dir)
    deltas = [after - before for after, before in zip(final_weights(run_dir), initial_trainable(config))]
    return config, MetricsLog(run_dir).rows()[0], deltas


@pytest.mark.parametrize("name", NAMES)
def test_the_first_server_step_is_the_configured_optimizers(tmp_path, name, plain_fedavg_round):
    reference, reference_row, deltas = plain_fedavg_round
    config = load(name, "rounds=1", "eval_clients=1")
    # Same clients, same client training: only the server optimizer differs from the reference round.
    assert (config.client_optimizer, config.preprocess, config.seed) == (
        reference.client_optimizer, reference.preprocess, reference.seed)
    quiet_train(config, tmp_path)
    row = MetricsLog(tmp_path).rows()[0]
    assert row["clients"] == reference_row["clients"]
    assert row["train"] == pytest.approx(reference_row["train"], rel=1e-5)
    steps = [after - before for after, before in zip(final_weights(tmp_path), initial_trainable(config))]
    assert any(np.abs(delta).max() > 1e-3 for delta in deltas)  # the clients moved the model
    for step, delta in zip(steps, deltas):
        expected = first_server_step(config.server_optimizer, delta)
        # float32 weights: each difference carries a rounding of about 1e-7 of the weight itself.
        np.testing.assert_allclose(step, expected, rtol=1e-3, atol=1e-6 * config.server_optimizer.learning_rate)


def test_fedavgm_carries_the_first_rounds_update_into_the_second(tmp_path, plain_fedavg_round):
    # Round 1 is the same with or without momentum, so round 2 trains the same clients from the same
    # model: its mean client update d2 is the same. With momentum m the server adds lr (m d1 + d2), without
    # lr d2; the two models differ by lr m d1, where d1 is the first round's mean client update.
    _, _, deltas = plain_fedavg_round
    config = load("fedavgm", "rounds=2", "eval_clients=1")
    quiet_train(config, tmp_path / "momentum")
    quiet_train(load("fedavgm", "rounds=2", "eval_clients=1", "server_optimizer.momentum=0"), tmp_path / "plain")
    server = config.server_optimizer
    assert server.name == "sgd" and server.momentum > 0
    for with_momentum, without, delta in zip(final_weights(tmp_path / "momentum"), final_weights(tmp_path / "plain"),
                                             deltas):
        np.testing.assert_allclose(with_momentum - without, server.learning_rate * server.momentum * delta,
                                   rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("cfg", [
    config_lib.OptimizerConfig(name="sgd", learning_rate=0.3),
    config_lib.OptimizerConfig(name="sgd", learning_rate=0.3, momentum=0.9),
    config_lib.OptimizerConfig(name="adam", learning_rate=0.01),
    config_lib.OptimizerConfig(name="yogi", learning_rate=0.01),
    config_lib.OptimizerConfig(name="adagrad", learning_rate=0.1),
], ids=lambda cfg: f"{cfg.name}-momentum{cfg.momentum}")
def test_a_step_leaves_the_learning_rate_the_state_holds(cfg):
    # The loop reads the training state's learning rates once, when the run starts (Experiment.start):
    # right only while no optimizer step changes them.
    import tensorflow as tf

    from fedmnist.process import build_optimizer

    optimizer = build_optimizer(cfg)
    weights = (tf.constant([1.0, -2.0]), tf.constant(0.5))
    state = optimizer.initialize(tf.nest.map_structure(lambda w: tf.TensorSpec(w.shape, w.dtype), weights))
    before = float(optimizer.get_hparams(state)["learning_rate"])
    for _ in range(3):
        state, weights = optimizer.next(state, weights, (tf.constant([0.3, -0.1]), tf.constant(2.0)))
    assert before == pytest.approx(cfg.learning_rate) and float(optimizer.get_hparams(state)["learning_rate"]) == before
    assert float(weights[1]) != 0.5  # the steps moved the weights
