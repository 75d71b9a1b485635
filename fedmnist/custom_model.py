"""The article's second half: the same softmax regression written by hand as a
`tff.learning.models.VariableModel`, without Keras.

This is the tutorial's `MnistModel`: weights 784x10 and bias 10 starting at zero (as
`create_keras_model`'s), local variables that sum the examples, loss and accuracy seen in a round,
and finalizers that turn those sums into the metrics the server reports. Trained with the same
process on the same data it gives the Keras model's numbers (see notebooks/custom_model.ipynb).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.data.preprocessing import input_spec

NUM_CLASSES = 10

MnistVariables = collections.namedtuple(
    "MnistVariables", "weights bias num_examples loss_sum accuracy_sum")


def create_mnist_variables() -> MnistVariables:
    return MnistVariables(
        weights=tf.Variable(lambda: tf.zeros(dtype=tf.float32, shape=(784, NUM_CLASSES)),
                            name="weights", trainable=True),
        bias=tf.Variable(lambda: tf.zeros(dtype=tf.float32, shape=(NUM_CLASSES,)),
                         name="bias", trainable=True),
        num_examples=tf.Variable(0.0, name="num_examples", trainable=False),
        loss_sum=tf.Variable(0.0, name="loss_sum", trainable=False),
        accuracy_sum=tf.Variable(0.0, name="accuracy_sum", trainable=False))


def predict_on_batch(variables: MnistVariables, x: tf.Tensor) -> tf.Tensor:
    return tf.nn.softmax(tf.matmul(x, variables.weights) + variables.bias)


def mnist_forward_pass(variables: MnistVariables, batch) -> tuple[tf.Tensor, tf.Tensor]:
    """The batch's mean cross-entropy and predicted labels; adds the batch to the metric sums."""
    y = predict_on_batch(variables, batch["x"])
    predictions = tf.cast(tf.argmax(y, 1), tf.int32)

    flat_labels = tf.reshape(batch["y"], [-1])
    loss = -tf.reduce_mean(
        tf.reduce_sum(tf.one_hot(flat_labels, NUM_CLASSES) * tf.math.log(y), axis=[1]))
    accuracy = tf.reduce_mean(tf.cast(tf.equal(predictions, flat_labels), tf.float32))

    num_examples = tf.cast(tf.size(batch["y"]), tf.float32)

    variables.num_examples.assign_add(num_examples)
    variables.loss_sum.assign_add(loss * num_examples)
    variables.accuracy_sum.assign_add(accuracy * num_examples)

    return loss, predictions


def get_local_unfinalized_metrics(variables: MnistVariables) -> collections.OrderedDict:
    """What each client sends: sums, which the server adds up over clients before finalizing."""
    return collections.OrderedDict(
        num_examples=[variables.num_examples],
        loss=[variables.loss_sum, variables.num_examples],
        accuracy=[variables.accuracy_sum, variables.num_examples])


def get_metric_finalizers() -> collections.OrderedDict:
    return collections.OrderedDict(
        num_examples=tf.function(func=lambda x: x[0]),
        loss=tf.function(func=lambda x: x[0] / x[1]),
        accuracy=tf.function(func=lambda x: x[0] / x[1]))


class MnistModel(tff.learning.models.VariableModel):
    """The tutorial's hand-written model; pass the class itself as `model_fn`."""

    def __init__(self):
        self._variables = create_mnist_variables()

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return [self._variables.weights, self._variables.bias]

    @property
    def non_trainable_variables(self) -> list[tf.Variable]:
        return []

    @property
    def local_variables(self) -> list[tf.Variable]:
        return [self._variables.num_examples, self._variables.loss_sum,
                self._variables.accuracy_sum]

    @property
    def input_spec(self) -> collections.OrderedDict:
        return input_spec()

    @tf.function
    def predict_on_batch(self, x, training=True):
        del training  # no dropout or batch norm: training and inference are the same
        return predict_on_batch(self._variables, x)

    @tf.function
    def forward_pass(self, batch, training=True) -> tff.learning.models.BatchOutput:
        del training
        loss, predictions = mnist_forward_pass(self._variables, batch)
        num_examples = tf.shape(batch["x"])[0]
        return tff.learning.models.BatchOutput(
            loss=loss, predictions=predictions, num_examples=num_examples)

    @tf.function
    def report_local_unfinalized_metrics(self) -> collections.OrderedDict:
        return get_local_unfinalized_metrics(self._variables)

    def metric_finalizers(self) -> collections.OrderedDict[str, Callable]:
        return get_metric_finalizers()

    @tf.function
    def reset_metrics(self) -> None:
        for variable in self.local_variables:
            variable.assign(tf.zeros_like(variable))
