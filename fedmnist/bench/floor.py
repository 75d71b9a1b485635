"""The floor: federated averaging in plain TensorFlow (no FL framework) on the package's own batches.

Each round it trains the same clients as the package's loop, on the same prepared tensors
(`fedmnist.client_tensors`), with the same client SGD steps and the same example-weighted server SGD
step, so its per-round metrics equal the package's and its time is what the arithmetic costs, plus what
any implementation of the round pays for its input: each client's tensors for the round, with the
round's shuffle order (`preprocess.shuffle: per_round`) computed as the package computes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from fedmnist.bench.figures import summarize
from fedmnist.bench.memory import TreeMemory
from fedmnist.clients.participation import Participation
from fedmnist.config import Config
from fedmnist.data.sources import FederatedDataset, load_dataset
from fedmnist.experiment import prepared_clients
from fedmnist.model import create_model, initial_weights

ClientTraining = Callable[[list[tf.Tensor], tf.Tensor, tf.Tensor, tf.Tensor], tuple]


def round_clients(config: Config, client_ids: Sequence[str]) -> Callable[[int], list[str]]:
    """Each round's clients, as the package's loop picks them (fedmnist.clients.participation)."""
    participation = Participation(config, client_ids)
    return lambda round_num: participation.plan(round_num).completed


def check_plain_sgd(config: Config) -> None:
    if config.client_optimizer.name != "sgd" or config.server_optimizer.name != "sgd" or \
            config.client_optimizer.momentum or config.server_optimizer.momentum:
        raise ValueError("the floor implements plain SGD on clients and server only")


def client_training(keras_model: tf.keras.Model, batch_size: int, learning_rate: float) -> ClientTraining:
    """One client's local SGD from the global weights over its prepared batches, traced once.

    Returns its example-weighted weight delta, its number of examples, and its summed loss and
    correct predictions (TFF's metrics over all local steps).
    """
    variables = keras_model.trainable_variables
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def train_client(start_weights, x, y, order):
        for variable, value in zip(variables, start_weights):
            variable.assign(value)
        loss_sum, correct = tf.zeros([], tf.float32), tf.zeros([], tf.float32)
        for start in tf.range(0, tf.size(order), batch_size):
            indices = order[start:start + batch_size]
            xb, yb = tf.gather(x, indices), tf.gather(y, indices)
            with tf.GradientTape() as tape:
                predictions = keras_model(xb, training=True)
                loss = loss_fn(yb, predictions)
            gradients = tape.gradient(loss, variables)
            for variable, gradient in zip(variables, gradients):
                variable.assign_sub(learning_rate * gradient)
            count = tf.cast(tf.size(indices), tf.float32)
            loss_sum += loss * count
            hits = tf.equal(tf.argmax(predictions, axis=-1, output_type=tf.int32), yb[:, 0])
            correct += tf.reduce_sum(tf.cast(hits, tf.float32))
        examples = tf.cast(tf.size(order), tf.float32)
        deltas = [examples * (w - v) for w, v in zip(start_weights, variables)]
        return deltas, examples, loss_sum, correct

    return train_client


def fed_avg_round(train_client: ClientTraining, client_tensors: Callable[[str], dict], clients: list[str],
                  weights: list[tf.Tensor], server_lr: float) -> tuple[list[tf.Tensor], float, dict]:
    """One round: every client's training summed, then the server's SGD step on the weighted mean delta.

    Returns the new weights, the round's number of examples and its training loss and accuracy.
    """
    totals = None
    for client_id in clients:
        arrays = client_tensors(client_id)
        result = train_client(weights, arrays["x"], arrays["y"], arrays["order"])
        totals = result if totals is None else tf.nest.map_structure(tf.add, totals, result)
    deltas, examples, loss_sum, correct = totals
    weights = [w - server_lr * d / examples for w, d in zip(weights, deltas)]
    examples = float(examples)
    return weights, examples, {"loss": float(loss_sum) / examples, "accuracy": float(correct) / examples}


def run_floor(config: Config, dataset: FederatedDataset | None = None, nudge_weights: bool = False) -> dict:
    """FedAvg with client SGD and server SGD in plain TensorFlow over the prepared batches.

    `nudge_weights` moves every initial weight by one float32 step (ulp): the run then measures how far
    float32 rounding alone moves this workload's trajectory, the yardstick for "agree".
    """
    check_plain_sgd(config)
    with TreeMemory() as memory:
        tf.keras.utils.set_random_seed(config.seed)
        dataset = dataset or load_dataset(config.data, config.seed)
        select = round_clients(config, dataset.train.client_ids)
        cache = prepared_clients(config, dataset.train)   # the same prepared batches
        keras_model = create_model(config.model, dataset.num_classes)
        weights = initial_weights(config.model, dataset.num_classes, config.seed).trainable
        train_client = client_training(keras_model, config.preprocess.batch_size,
                                       config.client_optimizer.learning_rate)

        if nudge_weights:
            weights = [np.nextafter(w, np.float32(np.inf)) for w in weights]
        weights = [tf.constant(w) for w in weights]
        seconds, per_round = [], []
        for round_num in range(1, config.rounds + 1):
            started = time.perf_counter()
            client_tensors = lambda client_id: cache.dataset(client_id, round_num).get_single_element()  # noqa: E731
            weights, examples, metrics = fed_avg_round(train_client, client_tensors, select(round_num), weights,
                                                       config.server_optimizer.learning_rate)
            per_round.append(metrics)
            seconds.append(time.perf_counter() - started)
    return summarize(seconds, examples, memory.peak, per_round[-1]["accuracy"], per_round,
                     evaluated_last=False)
