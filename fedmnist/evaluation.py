"""Step 4 of the article: federated evaluation of a global model with `build_fed_eval`; and
McMahan et al.'s measure, the server's centralized evaluation on a pooled test set."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.model import to_keras
from fedmnist.schedule import due
from fedmnist.values import to_python


class FederatedEvaluator:
    """Evaluates model weights on client datasets; the evaluation process is built once.

    Built before the first round: tracing it builds Keras models inside a graph, which would invalidate
    a Keras model built eagerly before it (the centralized evaluator's).
    """

    def __init__(self, model_fn: Callable[[], tff.learning.models.VariableModel]):
        # The iterator loop gives the same metrics as the default DatasetReduce loop, faster
        # in TFF's worker (docs/performance.md).
        self.process = tff.learning.algorithms.build_fed_eval(
            model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
        self._state = self.process.initialize()

    def __call__(self, weights: tff.learning.models.ModelWeights,
                 federated_data: Sequence[tf.data.Dataset]) -> dict:
        state = self.process.set_model_weights(self._state, weights)
        output = self.process.next(state, list(federated_data))
        return to_python(output.metrics["client_work"]["eval"]["current_round_metrics"])


class CentralizedEvaluator:
    """Evaluates model weights on one pooled test set with plain Keras in this process: no TFF round
    trip, so a run can afford it every round. The Keras model is built once; each call assigns weights.
    """

    def __init__(self, model_name: str, num_classes: int, pixels: np.ndarray, labels: np.ndarray,
                 batch_size: int = 1000):
        self.model_name, self.num_classes = model_name, num_classes
        self.pixels, self.labels, self.batch_size = pixels, labels, batch_size
        self._model: tf.keras.Model | None = None

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
    """The evaluations a round runs: federated evaluation on the clients' `data` (split -> datasets) every
    `every` rounds, and the server's centralized evaluation every `centralized_every` rounds (each also
    after the last round; None = never)."""

    def __init__(self, federated: FederatedEvaluator, data: dict[str, list[tf.data.Dataset]], every: int | None,
                 last_round: int, centralized: CentralizedEvaluator | None = None,
                 centralized_every: int | None = None):
        self.federated, self.data, self.every, self.last_round = federated, data, every, last_round
        self.centralized, self.centralized_every = centralized, centralized_every

    def __call__(self, round_num: int, weights: tff.learning.models.ModelWeights) -> dict | None:
        """The round's evaluation results by split (`train`, `test`, `centralized`), or None."""
        results = {}
        if due(self.every, round_num, self.last_round):
            results = {split: self.federated(weights, data) for split, data in self.data.items()}
        if self.centralized is not None and due(self.centralized_every, round_num, self.last_round):
            results["centralized"] = self.centralized(weights)
        return results or None
