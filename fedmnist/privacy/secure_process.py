"""Federated averaging whose server sees only masked client updates (`aggregation: secure`).

TFF has no cryptographic secure aggregation to run in simulation, so a round is split in three:

1. TFF, `client_phase`: broadcast the global model, train each client that has not dropped out
   (exactly the client work of `build_weighted_fed_avg`) and return every client's model delta and
   example weight. The round's simulated dropouts are drawn before training, so nothing from a
   client that drops before sending its masked input (its examples, loss or accuracy) reaches the
   metrics TFF sums in the clear; it still takes part in the key rounds of the protocol.
2. Python, `fedmnist.secagg`: each client clips and quantizes its delta, multiplies it by its
   weight, appends the weight, and masks the vector; the server (`secagg.server_aggregate`) sums the
   masked vectors and can unmask only their sum, from which it takes the weighted mean delta.
3. TFF, `server_phase`: the server optimizer applies the mean delta to the global model (exactly
   the finalizer of `build_weighted_fed_avg`).

What a client computes from its delta, and the server from the unmasked sum, is an encoder's:
`FixedPointEncoder` for `secure` (above), `distributed_dp.DistributedDpEncoder` for `secure_dp`
(clip, rotate, round, add a noise share; the server decodes the noised sum); `MaskedFedAvg` is the
round they share, `SecureFedAvg` and `SecureDpFedAvg` its two configurations.

`SecureFedAvg` has the surface of a `tff.learning.templates.LearningProcess` (`initialize`, `next`,
`get_model_weights`, `set_model_weights`) and the very same state, so the round loop, evaluation and
saving do not change. When the protocol aborts (more clients dropped than the threshold allows) the
round's output keeps the previous state: the global model is unchanged.

A client's weight is the number of examples it trains on (examples x epochs, as TFF's NUM_EXAMPLES
weighting counts them). The fixed-point range is sized for the largest weight a client can have
(`largest_client_weight` of the population, or `secure.max_client_weight`); weights are never capped.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.privacy import secagg
from fedmnist.privacy.distributed_dp import DdpParameters, DistributedDpEncoder
from fedmnist.process import ProcessBuilder


class SecureConfig(Protocol):
    """The protocol's settings this module reads: the `secure:` section (fedmnist/privacy/secure.py)."""

    dropout: float
    dropout_after_input: float
    bits: int
    clip: float


class UpdateEncoder(Protocol):
    """Turns a client's model delta into integers modulo 2^bits, and the unmasked sum into the mean delta."""

    bits: int
    length: int  # of a client's vector
    float32_bytes: int  # what TFF's float32 mean would upload per client
    uniform_weights: bool  # clients weighted equally (else by their examples)

    def begin_round(self, round_num: int) -> None: ...

    def encode(self, update: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray: ...

    def decode(self, total: np.ndarray, senders: int) -> tuple[np.ndarray, dict]: ...


class FixedPointEncoder:
    """`secure`: the clipped delta rounded to multiples of 1/scale, times the client's example weight,
    then the weight; the server divides the sum by the total weight."""

    uniform_weights = False

    def __init__(self, settings: SecureConfig, clients_per_round: int, max_weight: int, length: int):
        self.bits, self.clip, self.max_weight, self.length = settings.bits, settings.clip, max_weight, length
        self.scale = secagg.fixed_point_scale(settings.bits, settings.clip, max_weight, clients_per_round)
        self.float32_bytes = 4 * length  # the update and the weight

    def begin_round(self, round_num: int) -> None:
        pass

    def encode(self, update: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        return secagg.encode(update, weight, self.clip, self.scale, self.max_weight, self.bits)

    def decode(self, total: np.ndarray, senders: int) -> tuple[np.ndarray, dict]:
        mean, total_weight = secagg.decode_mean(total, self.scale, self.bits)
        return mean, {"total_weight": total_weight, "quantization_step": 1.0 / self.scale}


class MaskedFedAvg:
    """FedAvg with the Bonawitz et al. protocol in place of TFF's mean; `encoder` decides what the
    clients mask and how the server reads the unmasked sum."""

    def __init__(self, builder: ProcessBuilder, settings: SecureConfig, threshold: int, clients_per_round: int,
                 encoder: UpdateEncoder, seed: int = 0, entropy: Callable[[int], bytes] = os.urandom,
                 before_unmask: Callable[[int], object] = lambda round_num: None):
        """`builder`: the algorithm on the client input; `settings`: the protocol's simulated dropouts;
        `encoder.bits` is its modulus; `before_unmask(round)` is called before each run of the protocol
        (distributed DP counts its releases there)."""
        self.before_unmask = before_unmask
        self.round_num = 0
        secagg.check_bits(encoder.bits)
        self.settings, self.threshold, self.entropy, self.encoder = settings, threshold, entropy, encoder
        self.clients_per_round = clients_per_round
        self.seed = seed
        self._dropouts = np.random.default_rng([seed, 2017])
        self.last_view: secagg.ServerView | None = None  # what the server received in the last round
        weighted = not encoder.uniform_weights
        # The algorithm's own process provides the state, initialize and get/set_model_weights; its
        # parts, built with the same arguments, provide the two halves of `next`.
        self._fed_avg = builder.learning_process(weighted=weighted)
        weights_type = tff.learning.models.weights_type_from_model(builder.model_fn)
        distributor = tff.learning.templates.build_broadcast_process(weights_type)
        client_work = builder.client_work(weighted)
        finalizer = tff.learning.templates.build_apply_optimizer_finalizer(builder.server_optimizer_fn(),
                                                                           weights_type)
        state_type, data_type = self._fed_avg.next.type_signature.parameter
        update_type = tff.FederatedType(weights_type.trainable, tff.SERVER)
        self.length = encoder.length

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
        """Keys the simulated dropouts (and the encoder's public randomness) by round, so a resumed run
        drops the same clients."""
        self._dropouts = np.random.default_rng([self.seed, 2017, round_num])
        self.encoder.begin_round(round_num)
        self.round_num = round_num

    def next(self, state, client_data: Sequence[tf.data.Dataset]) -> tff.learning.templates.LearningProcessOutput:
        client_data = list(client_data)
        if len(client_data) > self.clients_per_round:  # the encoding's range is sized for clients_per_round
            raise ValueError(f"{len(client_data)} clients in a round, more than clients_per_round "
                             f"({self.clients_per_round})")
        numbers = range(1, len(client_data) + 1)
        dropped, late = self._draw_dropouts(len(client_data))
        online = [u for u in numbers if u not in dropped]
        report = collections.OrderedDict(clients=len(client_data), dropped=len(dropped),
                                         dropped_after_input=len(late), threshold=self.threshold)
        updates, weights, client_metrics = self._train(state, [client_data[u - 1] for u in online],
                                                       len(client_data))
        inputs = self._inputs(numbers, online, updates, weights)
        self.before_unmask(self.round_num)
        try:
            total, self.last_view = secagg.run_protocol(inputs, self.threshold, self.encoder.bits, dropped,
                                                        self.entropy, dropped_after_input=late)
        except secagg.SecureAggregationError as error:
            self.last_view = error.view
            report.update(failed=1, error=f"{error}; the round is skipped and the global model kept",
                          **self._traffic(error.view))
            return self._output(state, client_metrics, report, collections.OrderedDict(update_non_finite=0))
        mean, decoded = self.encoder.decode(total, len(self.last_view.masked_inputs))
        report.update(failed=0, **decoded, **self._traffic(self.last_view))
        new_state, finalizer_metrics = self.server_phase(state, _unflatten(mean, updates[0]))
        return self._output(new_state, client_metrics, report, finalizer_metrics)

    def _draw_dropouts(self, count: int) -> tuple[set[int], set[int]]:
        """Clients (numbered from 1) that drop before sending their masked input, and those that drop
        after sending it but before unmasking. Drawn before training, from the round's generator."""
        before = self._dropouts.random(count) < self.settings.dropout
        after = (self._dropouts.random(count) < self.settings.dropout_after_input) & ~before
        return {int(u) + 1 for u in np.flatnonzero(before)}, {int(u) + 1 for u in np.flatnonzero(after)}

    def _train(self, state, client_data: list[tf.data.Dataset], roster: int) -> tuple[list, list, object]:
        """Trains the clients still online, unless none is, or fewer clients than the threshold took
        part: then the protocol aborts at key sharing, before any client computes its input."""
        if not client_data or roster < self.threshold:
            return [], [], collections.OrderedDict(train=collections.OrderedDict())
        updates, weights, client_metrics = self.client_phase(state, client_data)
        return list(updates), list(weights), client_metrics

    def _inputs(self, numbers: range, online: list[int], updates: list, weights: list) -> dict[int, np.ndarray]:
        """The encoded input of each trained client, each drawing its secret randomness (rounding,
        noise) from its own OS entropy. A client that drops before sending its input, or that never
        trained because the round cannot succeed, holds a zero placeholder: the protocol needs an
        entry for every client of its roster but never reads or sends these."""
        inputs = {u: np.zeros(self.length, dtype=np.uint64) for u in numbers}
        for u, update, weight in zip(online, updates, weights):
            rng = np.random.default_rng(int.from_bytes(self.entropy(32), "big"))
            inputs[u] = self.encoder.encode(_flatten(update), weight, rng)
        return inputs

    def _traffic(self, view: secagg.ServerView | None) -> dict:
        """Bytes a client sent over the protocol, and how many more than TFF's float32 mean sends."""
        if view is None:
            return {}
        sent = view.mean_bytes_sent()
        return {"bytes_per_client": sent, "extra_bytes_per_client": sent - self.encoder.float32_bytes}

    @staticmethod
    def _output(state, client_metrics, report, finalizer_metrics) -> tff.learning.templates.LearningProcessOutput:
        metrics = collections.OrderedDict(distributor=(), client_work=client_metrics,
                                          aggregator=collections.OrderedDict(secure=report),
                                          finalizer=finalizer_metrics)
        return tff.learning.templates.LearningProcessOutput(state, metrics)


class SecureFedAvg(MaskedFedAvg):
    """Example-weighted FedAvg under secure aggregation (`aggregation: secure`)."""

    def __init__(self, builder: ProcessBuilder, settings: SecureConfig, threshold: int, clients_per_round: int,
                 max_weight: int, seed: int = 0, entropy: Callable[[int], bytes] = os.urandom):
        """`max_weight`: the bound on a client's weight that sizes the fixed-point range
        (`fedmnist.privacy.secure.secure_weight_bound`)."""
        secagg.check_bits(settings.bits)
        self.max_weight = max_weight
        # A masked input: every trainable weight, then the client's weight.
        encoder = FixedPointEncoder(settings, clients_per_round, max_weight, builder.num_params + 1)
        self.scale = encoder.scale
        super().__init__(builder, settings, threshold, clients_per_round, encoder, seed, entropy)


class SecureDpFedAvg(MaskedFedAvg):
    """Unweighted FedAvg with distributed DP under secure aggregation (`aggregation: secure_dp`)."""

    def __init__(self, builder: ProcessBuilder, settings: SecureConfig, params: DdpParameters, seed: int = 0,
                 entropy: Callable[[int], bytes] = os.urandom,
                 before_unmask: Callable[[int], object] = lambda round_num: None):
        """`params`: `distributed_dp.ddp_parameters` for this model; `settings`: the dropouts."""
        if params.dim != builder.num_params:
            raise ValueError(f"the parameters are for {params.dim} weights, the model has {builder.num_params}")
        self.params = params
        super().__init__(builder, settings, params.threshold, params.clients_per_round,
                         DistributedDpEncoder(params, seed), seed, entropy, before_unmask)


def _flatten(update) -> np.ndarray:
    return np.concatenate([np.asarray(part, dtype=np.float64).ravel() for part in tf.nest.flatten(update)])


def _unflatten(vector: np.ndarray, structure) -> list:
    parts, start = [], 0
    for part in tf.nest.flatten(structure):
        size = int(np.size(part))
        parts.append(vector[start:start + size].reshape(np.shape(part)).astype(np.float32))
        start += size
    return tf.nest.pack_sequence_as(structure, parts)
