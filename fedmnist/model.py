"""Step 2 of the article: the Keras model and the `model_fn` TFF builds its computations from."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.config import BUILT_IN_MODELS
from fedmnist.data.preprocessing import input_spec
from fedmnist.errors import ConfigError

MODELS = BUILT_IN_MODELS


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
    """A built-in model by name, or the user's own: `"package.module:function"`, a function that takes
    `num_classes` and returns an uncompiled Keras model for 784 inputs (`check_model` checks it)."""
    builders = {"linear": create_keras_model, "cnn": create_cnn_model, "2nn": create_2nn_model}
    if name in builders:
        return builders[name](num_classes)
    return user_model_function(name)(num_classes)


def user_model_function(name: str) -> Callable[[int], tf.keras.Model]:
    """The function `module:function` names; ConfigError when it cannot be had."""
    import importlib

    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - the user's module: any failure to import it is theirs
        raise ConfigError(f"model: importing {module_name!r} failed: {type(error).__name__}: {error}") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"model: {module_name!r} has no function {function_name!r}")
    return function


def check_model(name: str, num_classes: int) -> None:
    """ConfigError, in one line, unless model `name` builds an uncompiled Keras model that maps 784 inputs to
    `num_classes` class probabilities (the loss is sparse categorical cross-entropy on probabilities)."""
    if name in MODELS:
        return
    try:
        model = create_model(name, num_classes)
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's function: any failure is theirs
        raise ConfigError(f"model: {name}({num_classes}) failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, tf.keras.Model):
        raise ConfigError(f"model: {name}({num_classes}) returned {type(model).__name__}, not a Keras model")
    if getattr(model, "compiled_loss", None) is not None or model.optimizer is not None:
        raise ConfigError(f"model: {name}({num_classes}) returned a compiled model; return it uncompiled "
                          f"(fedmnist adds the loss and metrics)")
    inputs, outputs = tuple(model.input_shape), tuple(model.output_shape)
    if inputs != (None, 784):
        raise ConfigError(f"model: {name} takes inputs of shape {inputs}, not (None, 784) (the flattened 28x28 "
                          f"images, as batch_format_fn makes them)")
    if outputs != (None, num_classes):
        raise ConfigError(f"model: {name} gives outputs of shape {outputs}, not (None, {num_classes}) for the "
                          f"{num_classes} classes of this data")
    probabilities = model(np.random.default_rng(0).uniform(0, 1, (4, 784)).astype(np.float32)).numpy()
    if not (np.all(probabilities >= 0) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)):
        raise ConfigError(f"model: {name}'s outputs are not class probabilities; end it with a softmax "
                          f"(the loss is sparse categorical cross-entropy on probabilities)")


def build_model_fn(name: str = "linear", num_classes: int = 10) -> Callable[[], tff.learning.models.VariableModel]:
    """A no-argument `model_fn`, as `tff.learning` builders want it."""

    # TFF calls it inside its own AutoGraph-converted functions (federated evaluation's client work), where
    # AutoGraph would convert it and everything it calls (Keras model building, TFF's Keras wrapper) first,
    # for the same graph: about 0.9 s of a fresh process's first build (docs/performance.md).
    @tf.autograph.experimental.do_not_convert
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
