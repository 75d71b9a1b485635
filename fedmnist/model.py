"""Step 2 of the article: the Keras model and the `model_fn` TFF builds its computations from."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.data.preprocessing import input_spec

MODELS = ("linear", "cnn", "2nn")


def create_keras_model(num_classes: int = 10) -> tf.keras.Model:
    """The tutorial's model: softmax regression on the 784 pixels, weights starting at zero."""
    return tf.keras.models.Sequential([
        tf.keras.layers.InputLayer(input_shape=(784,)),
        tf.keras.layers.Dense(num_classes, kernel_initializer="zeros"),
        tf.keras.layers.Softmax(),
    ])


def create_cnn_model(num_classes: int = 10) -> tf.keras.Model:
    """The CNN of McMahan et al. 2017: two 5x5 conv layers (32, 64) with 2x2 max-pooling, dense 512."""
    return tf.keras.models.Sequential([
        tf.keras.layers.InputLayer(input_shape=(784,)),
        tf.keras.layers.Reshape((28, 28, 1)),
        tf.keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2),
        tf.keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(512, activation="relu"),
        tf.keras.layers.Dense(num_classes),
        tf.keras.layers.Softmax(),
    ])


def create_2nn_model(num_classes: int = 10) -> tf.keras.Model:
    """The 2NN of McMahan et al. 2017: a multilayer perceptron with two hidden layers of 200 ReLU units."""
    return tf.keras.models.Sequential([
        tf.keras.layers.InputLayer(input_shape=(784,)),
        tf.keras.layers.Dense(200, activation="relu"),
        tf.keras.layers.Dense(200, activation="relu"),
        tf.keras.layers.Dense(num_classes),
        tf.keras.layers.Softmax(),
    ])


def create_model(name: str = "linear", num_classes: int = 10) -> tf.keras.Model:
    builders = {"linear": create_keras_model, "cnn": create_cnn_model, "2nn": create_2nn_model}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return builders[name](num_classes)


def build_model_fn(name: str = "linear", num_classes: int = 10) -> Callable[[], tff.learning.models.VariableModel]:
    """A no-argument `model_fn`, as `tff.learning` builders want it."""

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            create_model(name, num_classes),
            input_spec=input_spec(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

    return model_fn


model_fn = build_model_fn()  # The article's `model_fn`: the linear model on 10 digit classes.


def initial_weights(name: str, num_classes: int, seed: int) -> tff.learning.models.ModelWeights:
    """Seeded starting weights, so a run's first global model does not depend on graph seeds."""
    tf.keras.utils.set_random_seed(seed)
    keras_model = create_model(name, num_classes)
    return tff.learning.models.ModelWeights(
        trainable=[np.asarray(w) for w in keras_model.trainable_weights],
        non_trainable=[np.asarray(w) for w in keras_model.non_trainable_weights])


def to_keras(weights: tff.learning.models.ModelWeights, name: str, num_classes: int) -> tf.keras.Model:
    """A compiled Keras model holding `weights`, ready to save, evaluate or predict."""
    keras_model = create_model(name, num_classes)
    weights.assign_weights_to(keras_model)
    keras_model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(),
                        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
    return keras_model


def update_shapes(model_fn: Callable[[], tff.learning.models.VariableModel]) -> list[tuple[int, ...]]:
    """Shapes of the trainable weights, i.e. of a client's model update."""
    trainable = tff.learning.models.weights_type_from_model(model_fn).trainable
    return [tuple(int(d) for d in tensor.shape) for tensor in trainable]
