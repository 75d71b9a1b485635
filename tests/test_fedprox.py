"""`algorithm: fedprox`: one round equals FedProx computed by hand in plain TensorFlow (each client's loss
plus the proximal term (mu / 2) ||w - w_global||^2), and TFF 0.87's own builder is shown to add that term's
gradient with the opposite sign, which is why fedmnist does not use it."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import config as config_lib
from fedmnist import data, model
from fedmnist.experiment import process_builder
from fedmnist.registry import AGGREGATIONS, ALGORITHMS
from helpers import train_main

# The article's client rate. At 0.05, SGD on these pixels (background 1.0, so large inputs) oscillates and
# amplifies the float rounding by which TFF's and Keras's steps differ: FedAvg alone then misses 1e-5.
MU, CLIENT_LR, SERVER_LR = 0.5, 0.02, 1.0


def proximal_sgd(start, batches, learning_rate: float, mu: float):
    """A client's FedProx in plain Keras/TensorFlow: SGD on the batch loss plus (mu / 2) ||w - start||^2."""
    keras_model = model.create_keras_model()
    keras_model.set_weights(start)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
    optimizer = tf.keras.optimizers.SGD(learning_rate)
    anchor = [tf.constant(w) for w in start]
    examples = 0
    for batch in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(batch["y"], keras_model(batch["x"], training=True))
            loss += 0.5 * mu * tf.add_n([tf.reduce_sum(tf.square(w - a))
                                         for w, a in zip(keras_model.trainable_variables, anchor)])
        gradients = tape.gradient(loss, keras_model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, keras_model.trainable_variables))
        examples += int(batch["y"].shape[0])
    return [w.numpy() for w in keras_model.trainable_variables], examples


def by_hand(start, client_batches, mu: float) -> list[np.ndarray]:
    """The server's new weights: start + server_lr x the example-weighted mean of the clients' deltas."""
    local = [proximal_sgd(start, batches, CLIENT_LR, mu) for batches in client_batches]
    sizes = np.array([n for _, n in local], dtype=np.float64)
    assert len(set(sizes)) > 1, "clients of different sizes make the weighting matter"
    return [w + SERVER_LR * np.tensordot(sizes / sizes.sum(), np.stack([weights[i] - w for weights, _ in local]), 1)
            for i, w in enumerate(start)]


@pytest.fixture(scope="module")
def round_setup(tff_runtime):
    """Three label-skewed digits clients of different sizes, their batches for round 1 as the run shuffles
    them, and random starting weights (the proximal term is zero at zero weights' first step otherwise)."""
    config = config_lib.load(None, ["data.dataset=digits", "data.partition=dirichlet", "data.dirichlet_alpha=1.0",
                                    "algorithm=fedprox", f"fedprox.proximal_strength={MU}", "preprocess.epochs=2",
                                    f"client_optimizer.learning_rate={CLIENT_LR}"])
    dataset = data.load_digits(num_clients=12, method="dirichlet", alpha=1.0, seed=0)
    ids = dataset.train.client_ids[:3]
    start = [np.random.default_rng(1).normal(0, 0.05, (784, 10)).astype(np.float32),
             np.random.default_rng(2).normal(0, 0.05, 10).astype(np.float32)]
    builder = process_builder(config, model.build_model_fn(), ALGORITHMS.get("fedprox")(config), dataset.train)

    def pipelines() -> list[tf.data.Dataset]:
        """Round 1's pipelines, built afresh: a shuffled dataset visits a new order on each iteration, and
        TFF's worker sees the first."""
        tf.keras.utils.set_random_seed(config.seed)  # shuffles read it, as in a run
        return data.make_round_data(dataset.train, ids, 1, builder.preprocessing)

    return config, builder, ids, start, pipelines


def batches(pipelines) -> list[list[dict]]:
    return [list(pipeline) for pipeline in pipelines()]


def one_round(process, client_inputs, start):
    state = process.set_model_weights(process.initialize(),
                                      tff.learning.models.ModelWeights(trainable=start, non_trainable=[]))
    return process.get_model_weights(process.next(state, client_inputs).state).trainable


def test_a_fedprox_round_equals_fedprox_by_hand(round_setup):
    config, builder, ids, start, pipelines = round_setup
    training = AGGREGATIONS.get("plain")(config).build(builder)   # what a run with `algorithm: fedprox` trains
    tf.keras.utils.set_random_seed(config.seed)
    ours = one_round(training.process, training.client_inputs(ids, 1), start)
    expected = by_hand(start, batches(pipelines), MU)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # The term matters at this strength: FedAvg's round (mu = 0) is measurably elsewhere.
    fed_avg = by_hand(start, batches(pipelines), 0.0)
    assert max(np.max(np.abs(a - b)) for a, b in zip(ours, fed_avg)) > 1e-3


def test_tffs_fed_prox_adds_the_proximal_gradient_with_the_opposite_sign(round_setup):
    config, builder, ids, start, pipelines = round_setup
    theirs = tff.learning.algorithms.build_weighted_fed_prox(
        model.build_model_fn(), MU, tff.learning.optimizers.build_sgdm(CLIENT_LR),
        tff.learning.optimizers.build_sgdm(SERVER_LR))
    new = one_round(theirs, pipelines(), start)
    for a, b in zip(new, by_hand(start, batches(pipelines), -MU)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert max(np.max(np.abs(a - b)) for a, b in zip(new, by_hand(start, batches(pipelines), MU))) > 1e-3


def test_fedprox_runs_from_the_command_line_and_datasets_input_is_refused(tmp_path):
    done = train_main("--dataset", "digits", "--algorithm", "fedprox", "--rounds", "2", "--quiet",
                      "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "algorithm: FedProx, proximal strength mu = 0.01" in done.stdout
    assert config_lib.read_yaml(tmp_path / "run" / "config.yaml")["fedprox"] == {"proximal_strength": 0.01}
    refused = train_main("--dataset", "digits", "--algorithm", "fedprox", "--set", "client_input=datasets",
                         "--run-dir", str(tmp_path / "refused"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "needs client_input: prepared" in refused.stderr
