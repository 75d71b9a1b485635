"""Keras models as a user brings them (`model: user_models:NAME`), for tests/test_user_model.py."""

import tensorflow as tf


def small_mlp(num_classes: int) -> tf.keras.Model:
    """What a user writes: an uncompiled model for the 784 flattened pixels, ending in a softmax."""
    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(784,)),
        tf.keras.layers.Dense(32, activation="relu"),
        tf.keras.layers.Dense(num_classes, activation="softmax"),
    ])


def images_in(num_classes: int) -> tf.keras.Model:
    return tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(28, 28)), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(num_classes, activation="softmax")])


def three_classes(num_classes: int) -> tf.keras.Model:
    return tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(784,)),
                                tf.keras.layers.Dense(3, activation="softmax")])


def logits(num_classes: int) -> tf.keras.Model:
    return tf.keras.Sequential([tf.keras.layers.InputLayer(input_shape=(784,)), tf.keras.layers.Dense(num_classes)])


def compiled(num_classes: int) -> tf.keras.Model:
    model = small_mlp(num_classes)
    model.compile(loss="sparse_categorical_crossentropy")
    return model
