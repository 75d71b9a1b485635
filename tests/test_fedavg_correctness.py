"""One FedAvg round of the package equals plain TensorFlow doing the same SGD steps by hand."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import data, experiment, model
from fedmnist.config import OptimizerConfig
from fedmnist.process import build_training_process


def train_locally(start, batches, learning_rate):
    """Client SGD on each batch, in plain Keras/TensorFlow, from the global weights `start`."""
    keras_model = model.create_keras_model()
    keras_model.set_weights(start)
    optimizer = tf.keras.optimizers.SGD(learning_rate)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
    examples = 0
    for batch in batches:
        with tf.GradientTape() as tape:
            loss = loss_fn(batch["y"], keras_model(batch["x"], training=True))
        gradients = tape.gradient(loss, keras_model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, keras_model.trainable_variables))
        examples += int(batch["y"].shape[0])
    return [w.numpy() for w in keras_model.trainable_variables], examples


@pytest.mark.parametrize("server_lr", [1.0, 0.5])
def test_one_round_is_the_example_weighted_average(tff_runtime, server_lr):
    dataset = data.load_digits(num_clients=12, method="dirichlet", alpha=1.0, seed=0)
    client_ids = dataset.train.client_ids[:3]
    start = [np.random.default_rng(1).normal(0, 0.01, (784, 10)).astype(np.float32),
             np.random.default_rng(2).normal(0, 0.01, 10).astype(np.float32)]

    process = build_training_process(model.build_model_fn(), OptimizerConfig(learning_rate=0.02),
                                     OptimizerConfig(learning_rate=server_lr))
    initial = tff.learning.models.ModelWeights(trainable=start, non_trainable=[])
    state = process.set_model_weights(process.initialize(), initial)
    result = process.next(state, data.make_federated_data(dataset.train, client_ids))
    federated = process.get_model_weights(result.state).trainable
    shortcut = experiment.model_weights(process, result.state)   # what the round loop reads, without a worker call
    for a, b in zip(shortcut.trainable, federated):
        np.testing.assert_array_equal(a, b)

    local = [train_locally(start, data.make_federated_data(dataset.train, [cid])[0], 0.02) for cid in client_ids]
    sizes = np.array([n for _, n in local], dtype=np.float64)
    assert len(set(sizes)) > 1, "clients of different sizes make the weighting matter"
    for i, global_weight in enumerate(start):
        deltas = np.stack([weights[i] - global_weight for weights, _ in local])
        average = np.tensordot(sizes / sizes.sum(), deltas, axes=1)
        np.testing.assert_allclose(federated[i], global_weight + server_lr * average, atol=1e-5)
    assert result.metrics["client_work"]["train"]["num_examples"] == sizes.sum()
