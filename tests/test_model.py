"""The tutorial's Keras models and their TFF wrapping (fedmnist.model)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import model
from fedmnist.data import input_spec

pytestmark = pytest.mark.unit


def test_linear_model_is_the_tutorials():
    keras_model = model.create_keras_model()
    layers = keras_model.layers
    assert [type(layer).__name__ for layer in layers] == ["Dense", "Softmax"]
    assert keras_model.input_shape == (None, 784) and keras_model.output_shape == (None, 10)
    assert all(np.all(w == 0) for w in keras_model.get_weights())
    assert keras_model.count_params() == 784 * 10 + 10


def test_cnn_is_mcmahan_et_al():
    cnn = model.create_cnn_model()
    convs = [layer for layer in cnn.layers if isinstance(layer, tf.keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size) for c in convs] == [(32, (5, 5)), (64, (5, 5))]
    assert sum(isinstance(layer, tf.keras.layers.MaxPooling2D) for layer in cnn.layers) == 2
    dense = [layer.units for layer in cnn.layers if isinstance(layer, tf.keras.layers.Dense)]
    assert dense == [512, 10]
    probabilities = cnn(tf.random.uniform([3, 784]))
    assert np.allclose(probabilities.numpy().sum(axis=1), 1.0, atol=1e-5)


def test_model_fn_wraps_keras_for_tff():
    tff_model = model.build_model_fn("linear", 62)()
    assert isinstance(tff_model, tff.learning.models.VariableModel)
    assert tff_model.input_spec == input_spec()
    assert [v.shape for v in tff_model.trainable_variables] == [(784, 62), (62,)]


def test_initial_weights_depend_only_on_the_seed():
    first = model.initial_weights("cnn", 10, seed=7)
    again = model.initial_weights("cnn", 10, seed=7)
    other = model.initial_weights("cnn", 10, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first.trainable, again.trainable))
    assert not np.array_equal(first.trainable[0], other.trainable[0])


def test_to_keras_carries_the_weights():
    weights = model.initial_weights("cnn", 10, seed=1)
    keras_model = model.to_keras(weights, "cnn", 10)
    assert all(np.array_equal(a, b) for a, b in zip(keras_model.trainable_weights, weights.trainable))
