"""Step 4 of the article: federated evaluation of a global model with `build_fed_eval` (and the same
evaluation on prepared client tensors, `client_input: prepared`); and McMahan et al.'s measure, the
server's centralized evaluation on a pooled test set."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.client_tensors import PreparedClients, PreparedEvaluation, build_prepared_fed_eval
from fedmnist.model import to_keras
from fedmnist.schedule import due
from fedmnist.values import to_python


class FederatedEvaluator:
    """Evaluates model weights on client datasets with TFF's `build_fed_eval`, built once, when first needed:
    building it costs as much as a few tutorial rounds (tracing Keras models in TFF's graphs), so it is not
    built before round 1, nor in runs that never evaluate this way.

    It is built in the thread that evaluates, not in a background thread while rounds run: the build runs
    AutoGraph, which parses Python source, and CPython 3.11's AST constructor keeps one recursion counter for
    all threads (python/cpython#106905). Built in the background, it once failed to convert TFF's client
    evaluation ("SystemError: AST constructor recursion depth mismatch"), and AutoGraph's fallback, the
    unconverted dataset loop, traced forever (docs/measurements.md, "An evaluation build that never ended").

    Building it builds Keras models inside graphs, which leaves every Keras model built eagerly before it
    in an invalid state ("Your Layer or Model is in an invalid state"): Keras switches the classes of all
    Sequential models between graph and eager versions as models are built. `ready()` says when it has just
    built, so that an eager model in use (the centralized evaluator's) is built again.
    """

    def __init__(self, model_fn: Callable[[], tff.learning.models.VariableModel],
                 data: Callable[[], dict[str, list[tf.data.Dataset]]] | None = None):
        """`data`, when given, makes the datasets a run evaluates on (split -> client datasets), with the
        process (`self.data` once `ready()`)."""
        self.model_fn, self._make_data = model_fn, data
        self.process: tff.learning.templates.LearningProcess | None = None
        self.data: dict[str, list[tf.data.Dataset]] | None = None
        self._state = None

    def ready(self) -> bool:
        """Builds the process and initializes its state, unless done already; True when it built now."""
        if self.process is not None:
            return False
        # The iterator loop gives the same metrics as the default DatasetReduce loop, faster
        # in TFF's worker (docs/performance.md).
        process = tff.learning.algorithms.build_fed_eval(
            self.model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
        self.data = self._make_data() if self._make_data else None
        self._state = process.initialize()
        self.process = process
        return True

    def __call__(self, weights: tff.learning.models.ModelWeights,
                 federated_data: Sequence[tf.data.Dataset]) -> dict:
        self.ready()
        state = self.process.set_model_weights(self._state, weights)
        output = self.process.next(state, list(federated_data))
        return to_python(output.metrics["client_work"]["eval"]["current_round_metrics"])


# The most bytes of client examples sent to the worker in one evaluation call, and cached per split.
EVALUATION_GROUP_BYTES = 64 * 2**20


@dataclasses.dataclass
class PreparedSplit:
    """The evaluation clients of one split, read as prepared tensors."""
    clients: PreparedClients
    client_ids: list[str]


class PreparedFederatedEvaluator:
    """The same federated evaluation as `FederatedEvaluator` (the same batches, forward passes and TFF metric
    finalizers, metrics summed over the clients), on prepared client tensors: what `client_input: prepared`
    runs. TFF's worker then gets each client's tensors, not a `tf.data` pipeline to rebuild per client and
    call, and building it traces one forward pass instead of TFF's whole evaluation process
    (docs/performance.md). Built when first needed, in the evaluating thread, like `FederatedEvaluator`
    (whose notes on threads and on eager Keras models apply here as well). Clients are sent in groups of at
    most `group_bytes` of examples, so memory stays bounded however many clients are evaluated.
    """

    def __init__(self, model_fn: Callable[[], tff.learning.models.VariableModel], batch_size: int,
                 data: Callable[[], dict[str, PreparedSplit]] | None = None,
                 group_bytes: int = EVALUATION_GROUP_BYTES, read_files: bool = False):
        """`read_files`: the splits' clients are `PreparedClients` with a `files_dir`, which the worker reads."""
        self.model_fn, self.batch_size, self._make_data = model_fn, batch_size, data
        self.group_bytes, self.read_files = group_bytes, read_files
        self.process: PreparedEvaluation | None = None
        self.data: dict[str, PreparedSplit] | None = None

    def ready(self) -> bool:
        """Builds the computations and the splits' clients, unless done already; True when it built now."""
        if self.process is not None:
            return False
        self.process = build_prepared_fed_eval(self.model_fn, self.batch_size, self.read_files)
        self.data = self._make_data() if self._make_data else None
        return True

    def __call__(self, weights: tff.learning.models.ModelWeights, split: PreparedSplit) -> dict:
        self.ready()
        sums = None
        for group in split.clients.groups(split.client_ids, self.group_bytes):
            group_sums = self.process.evaluate(weights, group)
            del group  # before the next group is made: one group in memory at a time
            sums = group_sums if sums is None else tf.nest.map_structure(np.add, sums, group_sums)
        return to_python(self.process.finalize(sums))


class CentralizedEvaluator:
    """Evaluates model weights on one pooled test set with plain Keras in this process: no TFF round
    trip, so a run can afford it every round. The Keras model is built once; each call assigns weights.
    """

    def __init__(self, model_name: str, num_classes: int, pixels: np.ndarray, labels: np.ndarray,
                 batch_size: int = 1000):
        self.model_name, self.num_classes = model_name, num_classes
        self.pixels, self.labels, self.batch_size = pixels, labels, batch_size
        self._model: tf.keras.Model | None = None

    def forget_model(self) -> None:
        """Builds the Keras model again at the next call (after a federated evaluation was built, see
        `FederatedEvaluator`)."""
        self._model = None

    def __call__(self, weights: tff.learning.models.ModelWeights) -> dict:
        if self._model is None:
            self._model = to_keras(weights, self.model_name, self.num_classes)
        else:
            weights.assign_weights_to(self._model)
        # Keras' loss is the example-weighted mean, its accuracy the share correct: the same numbers
        # federated evaluation gives on the same examples.
        loss, accuracy = self._model.evaluate(self.pixels, self.labels, batch_size=self.batch_size, verbose=0)
        return {"loss": float(loss), "sparse_categorical_accuracy": float(accuracy),
                "num_examples": int(len(self.labels))}


class Evaluations:
    """The evaluations a round runs: federated evaluation on the clients' data (`federated.data`: split ->
    datasets, or prepared clients) every `every` rounds, and the server's centralized evaluation every
    `centralized_every` rounds (each also after the last round; None = never). The federated evaluation is
    built in the first round that runs it (`FederatedEvaluator`, `PreparedFederatedEvaluator`), and the
    centralized evaluation's Keras model is built again after it.
    """

    def __init__(self, federated: FederatedEvaluator | PreparedFederatedEvaluator, every: int | None, last_round: int,
                 centralized: CentralizedEvaluator | None = None, centralized_every: int | None = None):
        self.federated, self.every, self.last_round = federated, every, last_round
        self.centralized, self.centralized_every = centralized, centralized_every

    def __call__(self, round_num: int, weights: tff.learning.models.ModelWeights) -> dict | None:
        """The round's evaluation results by split (`train`, `test`, `centralized`), or None."""
        results = {}
        if due(self.every, round_num, self.last_round):
            if self.federated.ready() and self.centralized is not None:
                self.centralized.forget_model()
            results = {split: self.federated(weights, data) for split, data in self.federated.data.items()}
        if self.centralized is not None and due(self.centralized_every, round_num, self.last_round):
            results["centralized"] = self.centralized(weights)
        return results or None
