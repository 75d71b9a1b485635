"""`--explore`: the tutorial workload through each of the ways TFF can run it, timed on `process.next`
alone, each checked against the article's per-round metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import config as config_lib
from fedmnist import runtime
from fedmnist.bench.figures import max_diff
from fedmnist.bench.floor import round_clients
from fedmnist.client_tensors import build_prepared_fed_avg
from fedmnist.data.preprocessing import Preprocessing
from fedmnist.data.sources import FederatedDataset, load_dataset
from fedmnist.experiment import prepared_clients, preprocessing_settings
from fedmnist.model import build_model_fn, initial_weights
from fedmnist.process import build_optimizer


@dataclasses.dataclass(frozen=True)
class Tutorial:
    """The tutorial workload's config, data and client selection, shared by every variant."""

    config: config_lib.Config
    dataset: FederatedDataset
    settings: Preprocessing              # the article's preprocessing, with the config's values
    select: Callable[[int], list[str]]   # round number -> its clients

    @classmethod
    def load(cls) -> Tutorial:
        # The article's pipelines repeat one order per client (its seeded `preprocess`, rebuilt every round);
        # `shuffle=fixed` makes the prepared variants feed that order too.
        config = config_lib.load(None, ["data.dataset=digits", "preprocess.shuffle=fixed"])
        dataset = load_dataset(config.data, config.seed)
        return cls(config, dataset, preprocessing_settings(config.preprocess),
                   round_clients(config, dataset.train.client_ids))


@dataclasses.dataclass(frozen=True)
class Variant:
    build: Callable[[], tff.learning.templates.LearningProcess]
    feed: Callable[[list[str]], list] | None  # client ids -> process.next's input; None: prepared tensors
    max_calls: int = -1                       # the worker's max_concurrent_computation_calls
    workers: int = 1
    default_num_clients: int = 0              # the context's, with one worker


def _digits_dataset_computation(client_data, client_ids: list[str], settings: Preprocessing,
                                seed: int) -> tff.Computation:
    """A `tff.Computation` from a client id to its preprocessed dataset, built inside the worker
    (for `tff.simulation.compose_dataset_computation_with_learning_process`). The clients' examples
    are embedded in the computation, as a cached ClientData's `dataset_computation` would read them."""
    parts = [next(iter(client_data.create_tf_dataset_for_client(c).batch(10**6))) for c in client_ids]
    ends = np.cumsum([len(p["label"]) for p in parts])
    starts = ends - np.array([len(p["label"]) for p in parts])
    pixels = np.concatenate([p["pixels"].numpy() for p in parts])
    labels = np.concatenate([p["label"].numpy() for p in parts])

    @tff.tensorflow.computation(np.str_)
    def dataset_computation(client_id):
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(client_ids), tf.range(len(client_ids), dtype=tf.int64)),
            default_value=-1)
        i = table.lookup(client_id)
        start, end = tf.gather(tf.constant(starts), i), tf.gather(tf.constant(ends), i)
        examples = {"label": tf.constant(labels)[start:end], "pixels": tf.constant(pixels)[start:end]}
        tf.random.set_seed(seed)  # the graph seed that the eager pipeline takes from the global seed
        return settings.pipeline(tf.data.Dataset.from_tensor_slices(examples))

    return dataset_computation


def variants(tutorial: Tutorial) -> dict[str, Variant]:
    """The article's path first (the reference), then one TFF option at a time, then the package's."""
    config, train, settings = tutorial.config, tutorial.dataset.train, tutorial.settings
    model_fn = build_model_fn(config.model, tutorial.dataset.num_classes)
    iterator = tff.learning.LoopImplementation.DATASET_ITERATOR
    articles = lambda ids: [settings.pipeline(train.create_tf_dataset_for_client(c)) for c in ids]  # noqa: E731

    def fed_avg(**extra):
        return tff.learning.algorithms.build_weighted_fed_avg(
            model_fn, build_optimizer(config.client_optimizer), build_optimizer(config.server_optimizer), **extra)

    def composed():
        computation = _digits_dataset_computation(train, list(train.client_ids), settings, config.seed)
        return tff.simulation.compose_dataset_computation_with_learning_process(computation, fed_avg())

    def prepared_process():
        return build_prepared_fed_avg(model_fn, build_optimizer(config.client_optimizer),
                                      build_optimizer(config.server_optimizer), config.preprocess.batch_size)

    return {
        "article: build_weighted_fed_avg, tf.data each round": Variant(fed_avg, articles),
        "+ worker max_concurrent_computation_calls=1": Variant(fed_avg, articles, max_calls=1),
        "+ worker max_concurrent_computation_calls=2": Variant(fed_avg, articles, max_calls=2),
        "+ context default_num_clients=10": Variant(fed_avg, articles, default_num_clients=10),
        "+ LoopImplementation.DATASET_ITERATOR": Variant(lambda: fed_avg(loop_implementation=iterator), articles),
        "compose_dataset_computation (datasets built in the worker)": Variant(composed, lambda ids: list(ids)),
        "prepared tensors (package default)": Variant(prepared_process, None),
        "prepared tensors, 2 local workers": Variant(prepared_process, None, workers=2),
    }


def _context(stubs: list, default_num_clients: int) -> tff.framework.SyncExecutionContext:
    if len(stubs) > 1:
        return runtime.multi_worker_context(stubs)
    # Built here because the package's runtime.execution_context has no default_num_clients.
    return tff.framework.SyncExecutionContext(
        executor_fn=runtime.executor_factory(stubs[0], default_num_clients=default_num_clients),
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result)


@contextlib.contextmanager
def worker_context(variant: Variant) -> Iterator[None]:
    """TFF's default context on fresh local workers with the variant's settings, restored afterwards."""
    workers = [runtime.loopback_worker(max_concurrent_computation_calls=variant.max_calls)
               for _ in range(variant.workers)]
    stack = tff.framework.get_context_stack()
    previous = stack.current
    try:
        stack.set_default_context(_context([w.connect() for w in workers], variant.default_num_clients))
        yield
    finally:
        stack.set_default_context(previous)
        for w in workers:
            w.stop()


def time_variant(tutorial: Tutorial, variant: Variant, rounds: int) -> tuple[list[float], list[dict]]:
    """Each round's `process.next` seconds and training loss and accuracy."""
    config, dataset = tutorial.config, tutorial.dataset
    with worker_context(variant):
        tf.keras.utils.set_random_seed(config.seed)
        learning_process = variant.build()
        client_input = variant.feed or prepared_clients(config, dataset.train)
        state = learning_process.set_model_weights(
            learning_process.initialize(), initial_weights(config.model, dataset.num_classes, config.seed))
        seconds, per_round = [], []
        for round_num in range(1, rounds + 1):
            started = time.perf_counter()
            clients = tutorial.select(round_num)
            result = learning_process.next(state, client_input(clients) if variant.feed else client_input(clients, round_num))
            seconds.append(time.perf_counter() - started)
            state = result.state
            train = result.metrics["client_work"]["train"]
            per_round.append({"loss": float(train["loss"]),
                              "accuracy": float(train["sparse_categorical_accuracy"])})
    return seconds, per_round


def explore(rounds: int = 12, repeats: int = 2, log: Callable[[str], None] = print) -> dict:
    """Round times of the ways TFF can run the tutorial workload, and whether each keeps its numbers.

    The variants take turns within each repeat, so a burst of load on the machine slows them alike;
    each variant's figure is the best of its repeats' medians (round 1 left out).
    """
    tutorial = Tutorial.load()
    options = variants(tutorial)
    results, reference = {}, None
    for repeat, (name, variant) in ((r, v) for r in range(repeats) for v in options.items()):
        log(f"[explore {repeat + 1}/{repeats}] {name}")
        seconds, per_round = time_variant(tutorial, variant, rounds)
        reference = reference or per_round
        figures = results.setdefault(name, {"all_s_per_round": [], "max_metric_diff_vs_article": 0.0})
        figures["all_s_per_round"].append(statistics.median(seconds[1:]))
        figures["steady_s_per_round"] = min(figures["all_s_per_round"])
        figures["max_metric_diff_vs_article"] = max(figures["max_metric_diff_vs_article"],
                                                    max_diff(reference, per_round))
    return results
