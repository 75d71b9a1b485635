"""Federated averaging whose server sees only masked client updates (`aggregation: secure`).

TFF has no cryptographic secure aggregation to run in simulation, so a round is split in three:

1. TFF, `client_phase`: broadcast the global model, train each selected client (exactly the client
   work of `build_weighted_fed_avg`) and return every client's model delta and example weight.
2. Python, `fedmnist.secagg`: each client clips and quantizes its delta, multiplies it by its
   weight, appends the weight, and masks the vector; the server (`secagg.server_aggregate`) sums the
   masked vectors and can unmask only their sum, from which it takes the weighted mean delta.
3. TFF, `server_phase`: the server optimizer applies the mean delta to the global model (exactly
   the finalizer of `build_weighted_fed_avg`).

`SecureFedAvg` has the surface of a `tff.learning.templates.LearningProcess` (`initialize`, `next`,
`get_model_weights`, `set_model_weights`) and the very same state, so the round loop, evaluation and
saving do not change. When the protocol aborts (more clients dropped than the threshold allows) the
round's output keeps the previous state: the global model is unchanged.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.privacy import secagg
from fedmnist.config import OptimizerConfig, SecureConfig
from fedmnist.process import build_optimizer


class SecureFedAvg:
    """Example-weighted FedAvg with the Bonawitz et al. protocol in place of TFF's mean."""

    def __init__(self, model_fn: Callable[[], tff.learning.models.VariableModel],
                 client_optimizer: OptimizerConfig, server_optimizer: OptimizerConfig,
                 settings: SecureConfig, threshold: int, clients_per_round: int, seed: int = 0,
                 entropy: Callable[[int], bytes] = os.urandom):
        self.settings, self.threshold, self.entropy = settings, threshold, entropy
        self.scale = secagg.fixed_point_scale(settings.bits, settings.clip, settings.max_client_weight,
                                              clients_per_round)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self._dropouts = np.random.default_rng([seed, 2017])
        self.last_view: secagg.ServerView | None = None  # what the server received in the last round
        # TFF's own weighted FedAvg provides the state, initialize and get/set_model_weights; its
        # parts, built with the same arguments, provide the two halves of `next`.
        self._fed_avg = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn, build_optimizer(client_optimizer), build_optimizer(server_optimizer))
        weights_type = tff.learning.models.weights_type_from_model(model_fn)
        distributor = tff.learning.templates.build_broadcast_process(weights_type)
        client_work = tff.learning.templates.build_model_delta_client_work(
            model_fn, build_optimizer(client_optimizer),
            client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES)
        finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
            build_optimizer(server_optimizer), weights_type)
        state_type, data_type = self._fed_avg.next.type_signature.parameter
        update_type = tff.FederatedType(weights_type.trainable, tff.SERVER)

        @tff.federated_computation(state_type, data_type)
        def client_phase(state, client_data):
            broadcast = distributor.next(state.distributor, state.global_model_weights)
            trained = client_work.next(state.client_work, broadcast.result, client_data)
            return trained.result.update, trained.result.update_weight, trained.measurements

        @tff.federated_computation(state_type, update_type)
        def server_phase(state, mean_update):
            applied = finalizer.next(state.finalizer, state.global_model_weights, mean_update)
            # The distributor and client work are stateless apart from fixed hyperparameters.
            new_state = tff.federated_zip(tff.learning.templates.LearningAlgorithmState(
                applied.result, state.distributor, state.client_work, state.aggregator, applied.state))
            return new_state, applied.measurements

        self.client_phase, self.server_phase = client_phase, server_phase

    def initialize(self):
        return self._fed_avg.initialize()

    def get_model_weights(self, state) -> tff.learning.models.ModelWeights:
        return self._fed_avg.get_model_weights(state)

    def set_model_weights(self, state, weights: tff.learning.models.ModelWeights):
        return self._fed_avg.set_model_weights(state, weights)

    def get_hparams(self, state):
        return self._fed_avg.get_hparams(state)

    def begin_round(self, round_num: int) -> None:
        """Keys the simulated dropouts by round, so a resumed run drops the same clients."""
        self._dropouts = np.random.default_rng([self.seed, 2017, round_num])

    def next(self, state, client_data: Sequence[tf.data.Dataset]) -> tff.learning.templates.LearningProcessOutput:
        updates, weights, client_metrics = self.client_phase(state, list(client_data))
        if len(updates) < self.threshold:  # e.g. clients lost to availability dropouts before training ended
            report = collections.OrderedDict(
                clients=len(updates), dropped=0, threshold=self.threshold, failed=1,
                error=f"only {len(updates)} clients completed, fewer than the threshold {self.threshold}; "
                      f"the round is skipped and the global model kept")
            return self._output(state, client_metrics, report, collections.OrderedDict(update_non_finite=0))
        structure = updates[0]
        inputs = {number: secagg.encode(_flatten(update), weight, self.settings.clip, self.scale,
                                        self.settings.max_client_weight, self.settings.bits)
                  for number, (update, weight) in enumerate(zip(updates, weights), start=1)}
        dropped = {u for u in inputs if self._dropouts.random() < self.settings.dropout}
        report = collections.OrderedDict(clients=len(inputs), dropped=len(dropped), threshold=self.threshold)
        try:
            total, self.last_view = secagg.run_protocol(inputs, self.threshold, self.settings.bits, dropped,
                                                        self.entropy)
        except secagg.SecureAggregationError as error:
            self.last_view = error.view
            report.update(failed=1, error=f"{error}; the round is skipped and the global model kept",
                          **self._traffic(error.view))
            return self._output(state, client_metrics, report, collections.OrderedDict(update_non_finite=0))
        mean, total_weight = secagg.decode_mean(total, self.scale, self.settings.bits)
        report.update(failed=0, total_weight=total_weight, quantization_step=1.0 / self.scale,
                      **self._traffic(self.last_view))
        new_state, finalizer_metrics = self.server_phase(state, _unflatten(mean, structure))
        return self._output(new_state, client_metrics, report, finalizer_metrics)

    @staticmethod
    def _traffic(view: secagg.ServerView | None) -> dict:
        """Bytes a client sent over the protocol, and how many more than TFF's float32 mean sends
        (the update and the weight, 4 bytes each)."""
        if view is None:
            return {}
        sent = view.mean_bytes_sent()
        return {"bytes_per_client": sent, "extra_bytes_per_client": sent - 4 * view.length}

    @staticmethod
    def _output(state, client_metrics, report, finalizer_metrics) -> tff.learning.templates.LearningProcessOutput:
        metrics = collections.OrderedDict(distributor=(), client_work=client_metrics,
                                          aggregator=collections.OrderedDict(secure=report),
                                          finalizer=finalizer_metrics)
        return tff.learning.templates.LearningProcessOutput(state, metrics)


def _flatten(update) -> np.ndarray:
    return np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in tf.nest.flatten(update)])


def _unflatten(vector: np.ndarray, structure) -> list:
    parts, start = [], 0
    for part in tf.nest.flatten(structure):
        size = int(np.size(part))
        parts.append(vector[start:start + size].reshape(np.shape(part)).astype(np.float32))
        start += size
    return tf.nest.pack_sequence_as(structure, parts)
