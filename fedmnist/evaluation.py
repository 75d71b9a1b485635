"""Step 4 of the article: federated evaluation of a global model with `build_fed_eval`; and
McMahan et al.'s measure, the server's centralized evaluation on a pooled test set."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.model import to_keras
from fedmnist.schedule import due
from fedmnist.values import to_python


class FederatedEvaluator:
    """Evaluates model weights on client datasets with TFF's `build_fed_eval`, built once, when first needed.

    Building it costs as much as a few tutorial rounds (tracing Keras models in TFF's graphs), so it is not
    built before round 1: `start_building()` builds it in a background thread while rounds run, and the first
    call waits for that build (or builds it there). Its state is initialized in the calling thread, on the
    run's workers (TFF's execution contexts are per thread).

    Building it builds Keras models inside graphs, which leaves every Keras model built eagerly before it in
    an invalid state ("Your Layer or Model is in an invalid state"): Keras switches the classes of all
    Sequential models between graph and eager versions as models are built. `settle()` reports when a build
    has just finished, so an eager model in use (the centralized evaluator's) is built again; no eager model
    may be built while a build runs (`Evaluations` waits for it first).
    """

    def __init__(self, model_fn: Callable[[], tff.learning.models.VariableModel],
                 data: Callable[[], dict[str, list[tf.data.Dataset]]] | None = None):
        """`data`, when given, makes the datasets a run evaluates on (split -> client datasets), with the
        process (`self.data` once `ready()`)."""
        self.model_fn, self._make_data = model_fn, data
        self.process: tff.learning.templates.LearningProcess | None = None
        self.data: dict[str, list[tf.data.Dataset]] | None = None
        self._state = None
        self._thread: threading.Thread | None = None
        self._built: tuple | None = None
        self._error: BaseException | None = None

    def _build(self) -> tuple:
        # The iterator loop gives the same metrics as the default DatasetReduce loop, faster
        # in TFF's worker (docs/performance.md).
        process = tff.learning.algorithms.build_fed_eval(
            self.model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
        return process, (self._make_data() if self._make_data else None)

    def _build_in_background(self) -> None:
        try:
            self._built = self._build()
        except Exception as error:  # noqa: BLE001 - raised again in the thread that needs the process
            self._error = error

    @property
    def building(self) -> bool:
        """Whether a background build was started and not yet waited for (`settle`)."""
        return self._thread is not None

    def start_building(self) -> None:
        """Starts building the process in a background thread, unless it is built or being built."""
        if self.process is None and self._thread is None:
            self._thread = threading.Thread(target=self._build_in_background, name="build federated evaluation",
                                            daemon=True)
            self._thread.start()

    def settle(self) -> bool:
        """Waits for a build in progress; True when one finished (the caller's eager Keras models are then
        invalid and must be built again)."""
        if self._thread is None:
            return False
        self._thread.join()
        self._thread = None
        return True

    def ready(self) -> bool:
        """Builds the process if needed (or takes the background build's, waiting for it) and initializes its
        state; True when a build finished in this call."""
        if self.process is not None:
            return False
        built = self.settle()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._built is None:
            self._built, built = self._build(), True
        (process, data), self._built = self._built, None
        self._state = process.initialize()
        self.process, self.data = process, data
        return built

    def __call__(self, weights: tff.learning.models.ModelWeights,
                 federated_data: Sequence[tf.data.Dataset]) -> dict:
        self.ready()
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
    """The evaluations a round runs: federated evaluation on the clients' data (`federated.data`, split ->
    datasets) every `every` rounds, and the server's centralized evaluation every `centralized_every` rounds
    (each also after the last round; None = never).

    The federated evaluation is built when first needed: in a background thread that starts after the round
    before the first one that needs it, so that the build overlaps that round, or in that round itself when
    it is the first one evaluated here. One round, not all of them: the build is Python, tracing, and holds
    the interpreter's lock, and so are most of a short round's steps, so on a 2-core machine a longer overlap
    only slows the rounds it overlaps by about as much as it hides (docs/performance.md, "Start-up"); a long
    round, which mostly waits on the worker, hides more of it. `close()` waits for a build in progress.
    """

    def __init__(self, federated: FederatedEvaluator, every: int | None, last_round: int,
                 centralized: CentralizedEvaluator | None = None, centralized_every: int | None = None):
        self.federated, self.every, self.last_round = federated, every, last_round
        self.centralized, self.centralized_every = centralized, centralized_every

    def _keras_models_stale(self, built: bool) -> None:
        if built and self.centralized is not None:
            self.centralized.forget_model()

    def __call__(self, round_num: int, weights: tff.learning.models.ModelWeights) -> dict | None:
        """The round's evaluation results by split (`train`, `test`, `centralized`), or None."""
        results = {}
        if due(self.every, round_num, self.last_round):
            self._keras_models_stale(self.federated.ready())
            results = {split: self.federated(weights, data) for split, data in self.federated.data.items()}
        if self.centralized is not None and due(self.centralized_every, round_num, self.last_round):
            # No eager Keras model may be built or used while the federated evaluation is being built.
            self._keras_models_stale(self.federated.settle())
            results["centralized"] = self.centralized(weights)
        if round_num < self.last_round and due(self.every, round_num + 1, self.last_round):
            self.federated.start_building()  # needed in the next round: built while it trains
        return results or None

    def close(self) -> None:
        self.federated.settle()
