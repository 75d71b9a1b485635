"""Step 4 of the article: federated evaluation of a global model with `build_fed_eval`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.outputs.records import to_python


class FederatedEvaluator:
    """Evaluates model weights on client datasets; the evaluation process is built once."""

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
