"""Personalized evaluation with `tff.learning.algorithms.build_personalization_eval_computation`.

Each client receives the global model, measures it on its own test data (the baseline), fine-tunes a
copy with SGD for a few epochs on its own training data, and measures it again. The gain per client
is the accuracy after fine-tuning minus the baseline.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.config import PersonalizationConfig


def as_example(element):
    return collections.OrderedDict(x=tf.reshape(element["pixels"], [784]),
                                   y=tf.reshape(element["label"], [1]))


def _evaluate(model: tff.learning.models.VariableModel, dataset: tf.data.Dataset, batch_size: int):
    def accumulate(totals, batch):
        output = model.predict_on_batch(batch["x"], training=False)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(output, axis=1, output_type=tf.int32), tf.reshape(batch["y"], [-1])), tf.int32))
        return totals[0] + correct, totals[1] + tf.shape(batch["y"])[0]

    correct, count = dataset.batch(batch_size).reduce((0, 0), accumulate)
    return collections.OrderedDict(
        accuracy=tf.cast(correct, tf.float32) / tf.cast(tf.maximum(count, 1), tf.float32),
        num_examples=count)


def build_personalize_fn(cfg: PersonalizationConfig) -> Callable[[], Callable]:
    """A factory of the fine-tune-then-evaluate `tf.function` TFF runs on each client."""

    def factory():
        optimizer = tff.learning.optimizers.build_sgdm(learning_rate=cfg.learning_rate)

        @tf.function
        def personalize(model, train_data, test_data, context=None):
            del context
            weights = model.trainable_variables
            state = optimizer.initialize(tf.nest.map_structure(lambda v: tf.TensorSpec(v.shape, v.dtype), weights))
            for _ in tf.range(cfg.epochs):  # a graph loop: a Python range would unroll every epoch into the graph
                for batch in train_data.batch(cfg.batch_size):
                    with tf.GradientTape() as tape:
                        loss = model.forward_pass(batch, training=True).loss
                    gradients = tape.gradient(loss, weights)
                    state, updated = optimizer.next(state, tuple(weights), tuple(gradients))
                    for variable, value in zip(weights, updated):
                        variable.assign(value)
            return _evaluate(model, test_data, cfg.batch_size)

        return personalize

    return factory


def build_baseline_fn(batch_size: int) -> Callable:
    @tf.function
    def baseline(model, dataset):
        return _evaluate(model, dataset, batch_size)

    return baseline


class PersonalizationEvaluator:
    """Runs TFF's personalization evaluation and summarizes the per-client accuracy gain."""

    def __init__(self, model_fn: Callable[[], tff.learning.models.VariableModel], cfg: PersonalizationConfig,
                 max_clients: int = 1000):
        self.computation = tff.learning.algorithms.build_personalization_eval_computation(
            model_fn, collections.OrderedDict(finetuned=build_personalize_fn(cfg)),
            build_baseline_fn(cfg.batch_size), max_num_clients=max_clients)

    def __call__(self, weights: tff.learning.models.ModelWeights, train: tff.simulation.datasets.ClientData,
                 test: tff.simulation.datasets.ClientData, client_ids: Sequence[str]) -> dict:
        inputs = [collections.OrderedDict(
            train_data=train.create_tf_dataset_for_client(cid).map(as_example),
            test_data=test.create_tf_dataset_for_client(cid).map(as_example)) for cid in client_ids]
        metrics = self.computation(weights, inputs)
        before = np.asarray(metrics["baseline_metrics"]["accuracy"], dtype=np.float64)
        after = np.asarray(metrics["finetuned"]["accuracy"], dtype=np.float64)
        return summarize_gain(before, after)


def summarize_gain(before: np.ndarray, after: np.ndarray) -> dict:
    gain = after - before
    quartiles = np.percentile(gain, [25, 50, 75])
    return {"clients": int(len(gain)), "accuracy_before": float(before.mean()),
            "accuracy_after": float(after.mean()), "gain_mean": float(gain.mean()),
            "gain_q1": float(quartiles[0]), "gain_median": float(quartiles[1]), "gain_q3": float(quartiles[2]),
            "improved_share": float(np.mean(gain > 0))}
