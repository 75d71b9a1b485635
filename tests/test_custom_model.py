"""The tutorial's hand-written MnistModel against the Keras model it mirrors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedmnist import config, custom_model, data, model, runtime
from fedmnist.values import to_python
from fedmnist.process import build_training_process


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(num_clients=20)


def first_batch(federated: data.FederatedDataset) -> dict:
    dataset = data.make_federated_data(federated.train, federated.train.client_ids[:1])[0]
    return next(iter(dataset))


@pytest.mark.unit
def test_starts_from_the_keras_models_zero_weights():
    mine = custom_model.MnistModel()
    keras_model = model.create_keras_model()
    assert [v.shape for v in mine.trainable_variables] == [w.shape for w in keras_model.trainable_weights]
    for variable in mine.trainable_variables + mine.local_variables:
        assert not np.any(variable.numpy())


@pytest.mark.unit
def test_forward_pass_and_metrics_match_keras_on_random_weights(digits):
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.05, (784, 10)).astype(np.float32), rng.normal(0, 0.05, 10).astype(np.float32)]
    mine = custom_model.MnistModel()
    for variable, value in zip(mine.trainable_variables, weights):
        variable.assign(value)
    keras_model = model.create_keras_model()
    keras_model.set_weights(weights)
    batch = first_batch(digits)
    labels = batch["y"].numpy().ravel()

    probabilities = keras_model(batch["x"]).numpy()
    np.testing.assert_allclose(mine.predict_on_batch(batch["x"]).numpy(), probabilities, atol=1e-6)
    output = mine.forward_pass(batch)
    keras_loss = tf.keras.losses.SparseCategoricalCrossentropy()(batch["y"], probabilities)
    assert float(output.loss) == pytest.approx(float(keras_loss), abs=1e-5)
    np.testing.assert_array_equal(output.predictions.numpy(), probabilities.argmax(axis=1))
    assert int(output.num_examples) == len(labels)

    mine.forward_pass(batch)  # the metric sums now hold the batch twice; the finalized values do not change
    unfinalized = mine.report_local_unfinalized_metrics()
    final = {name: float(f(unfinalized[name])) for name, f in mine.metric_finalizers().items()}
    assert final["num_examples"] == 2 * len(labels)
    assert final["loss"] == pytest.approx(float(keras_loss), abs=1e-5)
    assert final["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(axis=1) == labels)))
    mine.reset_metrics()
    assert all(float(v.numpy()) == 0.0 for v in mine.local_variables)


def test_federated_averaging_learns_what_keras_learns(digits):
    federated_data = data.make_federated_data(digits.train, digits.train.client_ids[:4], epochs=2)
    client, server = config.OptimizerConfig(learning_rate=0.02), config.OptimizerConfig(learning_rate=1.0)
    results = {}
    with runtime.local_runtime():
        for name, model_fn in (("custom", custom_model.MnistModel), ("keras", model.build_model_fn())):
            process = build_training_process(model_fn, client, server)
            state, history = process.initialize(), []
            for _ in range(2):
                result = process.next(state, federated_data)
                state = result.state
                history.append(to_python(result.metrics["client_work"]["train"]))
            results[name] = (history, process.get_model_weights(state))
    (custom, custom_weights), (keras, keras_weights) = results["custom"], results["keras"]
    assert custom[1]["loss"] < custom[0]["loss"]
    for mine, theirs in zip(custom, keras):
        assert mine["num_examples"] == theirs["num_examples"]
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["accuracy"] == pytest.approx(theirs["sparse_categorical_accuracy"], abs=1e-6)
    for mine, theirs in zip(custom_weights.trainable, keras_weights.trainable):
        assert np.any(mine)
        np.testing.assert_allclose(mine, theirs, atol=1e-6)
