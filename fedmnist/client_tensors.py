"""Step 3, fast: exact rounds in which each client's preprocessed data is prepared once and trained without tf.data.

The article hands `process.next` a fresh `tf.data` pipeline per client per round
(`make_federated_data`). TFF serializes each pipeline, and its worker deserializes it and instantiates
the pipeline's and the training loop's functions again for every client in every round: on the tutorial
workload that per-client overhead, not the arithmetic, is nearly all of a round (docs/performance.md).

Here each client's examples are prepared once, as tensors (`x`, `y`, after `batch_format_fn`), and
each round adds the order in which the article's `preprocess` would visit them with that round's
shuffle seed (`order`: `repeat(epochs)` then `shuffle(buffer, seed)`, the pipeline's first-iteration
order, which is what TFF's worker sees of a pipeline built for the round). The client work below
slices the batches in exactly that order. The SGD steps, the client weighting, the aggregation and the metrics are TFF's,
so the per-round metrics equal the article's path (the tests check it to 1e-6).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import typing
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import machine
from fedmnist.data.preprocessing import Preprocessing, batch_format_fn, check_examples
from fedmnist.errors import DataUnavailableError, PlanTooLargeError

# A client's prepared data: all its examples (as `batch_format_fn` shapes a batch) and the order of
# the article's shuffled, repeated stream as indices into them.
PREPARED_SPEC = OrderedDict(
    x=tf.TensorSpec([None, 784], tf.float32),
    y=tf.TensorSpec([None, 1], tf.int32),
    order=tf.TensorSpec([None], tf.int32))
DEFAULT_CACHE_BYTES = 256 * 2**20
# `x` and `y` are padded with zeros (rows that `order` never picks) to one of a few size classes:
# tensors of a few sizes, not one size per client, let the allocators of this process and of the
# worker reuse freed buffers, so memory stays flat over hundreds of sampled rounds. Classes step by
# half the last power of two (..., 32, 48, 64, 96, 128, 192, ...), so at most 50% more rows. How many
# classes per doubling is a trade of bytes against memory growth, measured in docs/performance.md.
SIZE_CLASSES_PER_DOUBLING = 2
READ_BATCH = 4096  # examples read from a client's dataset at a time


@tf.function(input_signature=[PREPARED_SPEC], autograph=False)
def as_dataset(prepared: OrderedDict) -> tf.data.Dataset:
    """A one-element dataset of a client's prepared tensors, typed `PREPARED_SPEC` whatever its size.

    Built eagerly, `from_tensors` would record each client's exact shapes in its op, and TensorFlow
    keeps a kernel per distinct shape: memory would grow with every new client size seen (measured
    over federated EMNIST's size distribution). Traced once with unknown sizes, it does not.
    """
    return tf.data.Dataset.from_tensors(prepared)


# A client's input when the worker reads its examples itself (`PreparedClients(files_dir=...)`): the paths of
# its `x` and `y` (`tf.io.serialize_tensor` files) and the round's order. Sending each client's tensors with
# every call was most of what a small round paid TFF (docs/performance.md, "Client data read by the worker").
FILES_SPEC = OrderedDict(x=tf.TensorSpec([], tf.string), y=tf.TensorSpec([], tf.string),
                         order=tf.TensorSpec([None], tf.int32))


@tf.function(input_signature=[FILES_SPEC], autograph=False)
def as_files_dataset(files: OrderedDict) -> tf.data.Dataset:
    """A one-element dataset of a client's file paths and order, typed `FILES_SPEC` (as `as_dataset`)."""
    return tf.data.Dataset.from_tensors(files)


def read_prepared(files: OrderedDict) -> OrderedDict:
    """In the worker: the client's prepared tensors from its files, as `as_dataset` would have sent them."""
    x = tf.io.parse_tensor(tf.io.read_file(files["x"]), tf.float32)
    y = tf.io.parse_tensor(tf.io.read_file(files["y"]), tf.int32)
    x.set_shape(PREPARED_SPEC["x"].shape)
    y.set_shape(PREPARED_SPEC["y"].shape)
    return OrderedDict(x=x, y=y, order=files["order"])


def shuffle_order(num_examples: int, epochs: int, shuffle_buffer: int, seed: int) -> np.ndarray:
    """The order in which `preprocess` visits a client's examples on a dataset's first iteration.

    Shuffling depends only on the element count and the seeds, so the article's
    `repeat(epochs).shuffle(buffer, seed)` on the indices gives the order it applies to the examples.
    Like the article's pipeline it reads TensorFlow's global seed, which must be what it is when the
    article's path builds its datasets (`tf.keras.utils.set_random_seed(config.seed)` in the loop).
    """
    total = num_examples * epochs
    if total == 0:
        return np.zeros([0], np.int32)
    # tf.data reserves the whole buffer up front; one as large as the stream already shuffles it all, in the
    # same order as any larger one (docs/runs.md, "Limits").
    stream = tf.data.Dataset.range(num_examples).repeat(epochs).shuffle(min(shuffle_buffer, total), seed=seed)
    return stream.batch(total).get_single_element().numpy().astype(np.int32)


# A round's training orders (int32, one per example and epoch) are held this many times at once: the round's
# own here, the next round's prepared beside them, the copy TFF serializes for the worker and the worker's.
ORDER_COPIES = 4


def check_orders_fit(num_examples: int, round_examples: int, epochs: int) -> None:
    """PlanTooLargeError when the training orders of a round's clients so far (`round_examples` examples, this
    client's `num_examples` the last of them) would not fit in this machine's memory: each is held
    `ORDER_COPIES` times, and `shuffle_order` builds this client's as int64 first."""
    needed, memory = (4 * ORDER_COPIES * round_examples + 8 * num_examples) * epochs, machine.memory_bytes()
    if needed > memory:
        raise PlanTooLargeError(f"preprocess.epochs: {epochs:,} epochs of a round's {round_examples:,} examples "
                                f"need {machine.gigabytes(needed)} GB for the clients' training orders, more "
                                f"than this machine's {machine.gigabytes(memory)} GB; lower preprocess.epochs or "
                                f"clients_per_round")


def padded_rows(num_examples: int) -> int:
    """The rows allocated for a client's examples: the smallest size class that holds them."""
    power_of_two_below = 1 << max(num_examples.bit_length() - 1, 0)
    step = max(1, power_of_two_below // SIZE_CLASSES_PER_DOUBLING)
    return -(-num_examples // step) * step


def prepare_examples(dataset: tf.data.Dataset, size_classes: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """One client's examples as `batch_format_fn` shapes them (`x`, `y`) and their number.

    The examples fill the first rows, then zeros up to `padded_rows` if `size_classes`.
    """
    count = int(dataset.cardinality())
    if 0 <= count <= READ_BATCH:
        # Known and small (in-memory sources): one batch, read without an iterator, ten times faster.
        batches = [batch_format_fn(dataset.batch(count).get_single_element())] if count else []
    else:
        # Moderate batches: one batch of 2**31 - 1 stalls on TFF's SQL-backed EMNIST datasets.
        batches = [batch_format_fn(batch) for batch in dataset.batch(READ_BATCH)]
    num_examples = sum(len(b["y"]) for b in batches)
    rows = padded_rows(num_examples) if size_classes else num_examples
    x, y = np.zeros([rows, 784], np.float32), np.zeros([rows, 1], np.int32)
    start = 0
    for batch in batches:
        end = start + len(batch["y"])
        x[start:end], y[start:end] = batch["x"].numpy(), batch["y"].numpy()
        start = end
    return x, y, num_examples


def read_examples(client_data: tff.simulation.datasets.ClientData, client_id: str, size_classes: bool = True,
                  num_classes: int | None = None, origin: str = "the client data") -> tuple[np.ndarray, np.ndarray, int]:
    """`prepare_examples` for one client of `client_data`; with `num_classes`, its examples checked
    (`check_examples`). What cannot be read or is out of range raises DataUnavailableError naming the client
    and `origin` (its file), in one line."""
    where = f"client {client_id} of {origin}"
    try:
        x, y, num_examples = prepare_examples(client_data.create_tf_dataset_for_client(client_id), size_classes)
    except (tf.errors.OpError, UnicodeDecodeError, ValueError) as error:
        reason = str(getattr(error, "message", error)).splitlines()[0][:200]
        raise DataUnavailableError(f"{where}: its examples cannot be read ({reason})") from error
    if num_classes is not None:
        check_examples(x[:num_examples], y[:num_examples], num_classes, where)
    return x, y, num_examples


class ExaminedClients:
    """Reads and checks each client's examples once, the first time it is asked about (`read_examples`), for the
    article's datasets path (`client_input: datasets`): there TFF's worker is the first to read a client's
    examples, and a bad label or an unreadable example fails the round with the worker's multi-line error,
    which names neither the client nor the file. Prepared clients are checked as they are prepared."""

    def __init__(self, client_data: tff.simulation.datasets.ClientData, num_classes: int,
                 origin: str = "the client data"):
        self.client_data, self.num_classes, self.origin = client_data, num_classes, origin
        self._examined: set[str] = set()

    def __call__(self, client_ids: Sequence[str]) -> None:
        for client_id in client_ids:
            if client_id not in self._examined:
                read_examples(self.client_data, client_id, False, self.num_classes, self.origin)
                self._examined.add(client_id)


@dataclasses.dataclass
class _PreparedClient:
    x: tf.Tensor | None                     # None once written to files (`files_dir`): the worker reads them
    y: tf.Tensor | None
    num_examples: int
    nbytes: int
    seed: int | np.int64 | None = None      # the shuffle seed `dataset` was built with
    dataset: tf.data.Dataset | None = None
    files: tuple[str, str] | None = None    # where the worker reads `x` and `y` (with `files_dir`)


class PreparedClients:
    """Prepared client inputs for `process.next`, built on first use and kept in a bounded LRU cache.

    Each input is a one-element `tf.data.Dataset` (TFF's client-work template takes sequences) holding a
    client's prepared tensors, or, with `files_dir`, the paths of files holding them that local workers
    read. A client's examples are prepared once; its `order` is computed for the round's shuffle seed
    (`settings.seed`), so with a fixed seed the whole input is reused across rounds. The cache keeps memory
    flat when many clients are sampled: past `max_bytes` the least recently used clients are dropped and
    prepared again when next selected. `size_classes` pads them (see `SIZE_CLASSES_PER_DOUBLING`);
    it only pays when the clients change from round to round. `prefetch` prepares a coming round's
    clients in a background thread, while the worker trains the current round.
    """

    def __init__(self, client_data: tff.simulation.datasets.ClientData, settings: Preprocessing,
                 max_bytes: int = DEFAULT_CACHE_BYTES, size_classes: bool = True, num_classes: int | None = None,
                 origin: str = "the client data", files_dir: Path | None = None):
        """`num_classes` and `origin` check each client's examples as they are prepared (`check_examples`).
        With `files_dir` (a private directory local workers can read) each input is `FILES_SPEC`: the client's
        examples are written there once and read by the worker (`read_prepared`), only the order is sent."""
        self.client_data = client_data
        self.num_classes, self.origin = num_classes, origin
        self.settings = settings
        self.epochs, self.shuffle_buffer = settings.epochs, settings.shuffle_buffer
        self.size_classes = size_classes
        self.max_bytes = max_bytes
        self._cache: collections.OrderedDict[str, _PreparedClient] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the cache is shared with `prefetch`'s thread
        self._prefetching: tuple[threading.Thread, threading.Event] | None = None
        self.files_dir = files_dir
        self._written = itertools.count()
        # Files of evicted clients, deleted when the next round is asked for: a prefetch can evict a client that
        # the worker is still to read in the round it trains.
        self._stale: list[str] = []

    def _client(self, client_id: str) -> _PreparedClient:
        if client_id in self._cache:
            self._cache.move_to_end(client_id)
            return self._cache[client_id]
        x, y, num_examples = read_examples(self.client_data, client_id, self.size_classes, self.num_classes,
                                           self.origin)
        order_bytes = 4 * num_examples * self.epochs
        client = _PreparedClient(None, None, num_examples, x.nbytes + y.nbytes + order_bytes)
        if self.files_dir is not None:
            client.files = self._write(x, y)
        else:
            client.x, client.y = tf.constant(x), tf.constant(y)
        self._cache[client_id] = client
        self._bytes += client.nbytes
        while self._bytes > self.max_bytes and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._bytes -= evicted.nbytes
            self._stale.extend(evicted.files or ())
        return client

    def _write(self, x: np.ndarray, y: np.ndarray) -> tuple[str, str]:
        """A client's `x` and `y` in new files (new names each time: a stale copy is deleted later). Only the
        files are kept, so the cache's budget bounds the disk they take, not this process's memory."""
        number = next(self._written)
        paths = (str(self.files_dir / f"{number}.x"), str(self.files_dir / f"{number}.y"))
        for path, array in zip(paths, (x, y)):
            Path(path).write_bytes(tf.io.serialize_tensor(array).numpy())
        return paths

    def _delete_stale(self) -> None:
        with self._lock:
            stale, self._stale = self._stale, []
        for path in stale:
            Path(path).unlink(missing_ok=True)

    def dataset(self, client_id: str, round_num: int = 1) -> tf.data.Dataset:
        """The client's input for `round_num`: its examples in the order of that round's shuffle."""
        return self._prepare(client_id, round_num, 0)[0]

    def _prepare(self, client_id: str, round_num: int, held_examples: int) -> tuple[tf.data.Dataset, int]:
        """The client's input and its number of examples; `held_examples`: those of the round's clients
        prepared before it, whose orders are held too (`check_orders_fit`)."""
        with self._lock:
            client = self._client(client_id)
            seed = self.settings.seed(round_num, client_id)
            if client.seed != seed:
                check_orders_fit(client.num_examples, held_examples + client.num_examples, self.epochs)
                order = shuffle_order(client.num_examples, self.epochs, self.shuffle_buffer, seed)
                if client.files is not None:
                    client.dataset = as_files_dataset(OrderedDict(x=client.files[0], y=client.files[1], order=order))
                else:
                    client.dataset = as_dataset(OrderedDict(x=client.x, y=client.y, order=order))
                client.seed = seed
            return client.dataset, client.num_examples

    def _round(self, client_ids: Sequence[str], round_num: int) -> Iterator[tf.data.Dataset]:
        """The round's inputs one by one, each checked with the orders of the ones before it."""
        held = 0
        for client_id in client_ids:
            dataset, num_examples = self._prepare(client_id, round_num, held)
            held += num_examples
            yield dataset

    def prefetch(self, client_ids: Sequence[str], round_num: int) -> None:
        """Prepares the clients' inputs for `round_num` in a background thread, while the worker trains the
        round before it: the next call for them finds them ready. A client that fails here is left to that
        call, which raises its error in its turn. Waits for the previous prefetch first."""
        self.wait_for_prefetch()
        if not client_ids:
            return
        cancelled = threading.Event()

        def warm() -> None:
            try:
                for _ in self._round(client_ids, round_num):
                    if cancelled.is_set():
                        return
            except Exception:  # noqa: BLE001 - raised again, in order, by the round that needs the client
                return

        self._prefetching = (threading.Thread(target=warm, name="fedmnist-prefetch", daemon=True), cancelled)
        self._prefetching[0].start()

    def wait_for_prefetch(self, cancel: bool = False) -> None:
        """Returns when no prefetch runs; with `cancel`, after the client being prepared (the run is ending)."""
        if self._prefetching is not None:
            thread, cancelled = self._prefetching
            if cancel:
                cancelled.set()
            thread.join()
            self._prefetching = None

    def __call__(self, client_ids: Sequence[str], round_num: int = 1) -> list[tf.data.Dataset]:
        self._delete_stale()  # the round before this one is over: its clients' files are read
        return list(self._round(client_ids, round_num))

    def groups(self, client_ids: Sequence[str], max_bytes: int, round_num: int = 1) -> Iterator[list[tf.data.Dataset]]:
        """The clients' inputs in groups of at most `max_bytes` of prepared examples (one client at least), so
        that work on many clients can hold one group at a time. The caller is done with a group when it asks
        for the next one: the files of the clients evicted until then are deleted."""
        self._delete_stale()
        group, group_bytes = [], 0
        for client_id in client_ids:
            with self._lock:
                nbytes = self._client(client_id).nbytes
            if group and group_bytes + nbytes > max_bytes:
                yield group
                self._delete_stale()
                group, group_bytes = [], 0
            group.append(self.dataset(client_id, round_num))
            group_bytes += nbytes
        if group:
            yield group

    @property
    def cached_bytes(self) -> int:
        return self._bytes


def untraced(method: Callable) -> Callable:
    """The Python function behind `method` when it is a `tf.function` (TFF's Keras model wraps `forward_pass`
    and its metrics methods in them): called inside `train`, which AutoGraph does not convert, its body is then
    traced into `train`'s graph as written, not converted by AutoGraph first as a nested function."""
    return getattr(method, "python_function", method)


def unconverted_finalizers(model: tff.learning.models.VariableModel) -> OrderedDict:
    """The model's metric finalizers, traced without AutoGraph. TFF's Keras finalizers are `tf.function`s,
    which AutoGraph converts again at every build; their bodies assign the sums to a new metric's variables
    and read its result, with no Python control flow on tensors, so the graph is the same without it."""
    finalizers = OrderedDict()
    for name, finalizer in model.metric_finalizers().items():
        body = untraced(finalizer)
        finalizers[name] = finalizer if body is finalizer else tf.function(body, autograph=False)
    return finalizers


def train_on_prepared(model: tff.learning.models.VariableModel, optimizer: tff.learning.optimizers.Optimizer,
                      hparams, initial_weights, prepared: OrderedDict, batch_size: int,
                      weighted: bool = True, proximal_strength: float = 0.0,
                      ) -> tuple[tff.learning.templates.ClientResult, OrderedDict]:
    """One client's local SGD from `initial_weights`, as TFF's model-delta client work runs it: the
    batches are `order[i:i + batch_size]` (the whole client when `batch_size` is 0), gathered from the
    prepared `x` and `y`. Returns the update, its weight (the examples trained on, or 1 when not
    `weighted`) and the unfinalized metrics.

    With `proximal_strength` mu > 0 each step's gradient gets mu (w - initial_weights) added, the gradient
    of FedProx's proximal term (mu / 2) ||w - initial_weights||^2.

    Written with TensorFlow's own control flow (`tf.while_loop`, `tf.cond`), so it is traced as it is,
    without AutoGraph (`build_prepared_client_work` traces it with AutoGraph off): AutoGraph rewrote this
    function, and through it every function it calls (TFF's optimizer, checks and structure helpers), at
    every build, for the same graph (docs/performance.md, "Start-up")."""
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
    trainable = tuple(tf.nest.flatten(weights.trainable))
    optimizer_state = optimizer.set_hparams(
        optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)), hparams)
    order = prepared["order"]
    # `order` visits each of the client's examples once per epoch, so it indexes all of them:
    # its largest index + 1 is the client's size (the rows of `x` may be padded).
    step = tf.constant(batch_size) if batch_size else tf.maximum(tf.reduce_max(order) + 1, 1)
    steps_end = tf.size(order)

    def sgd_step(start, num_examples, optimizer_state):
        indices = order[start:start + step]
        batch = OrderedDict(x=tf.gather(prepared["x"], indices), y=tf.gather(prepared["y"], indices))
        with tf.GradientTape() as tape:
            output = untraced(model.forward_pass)(batch, training=True)
        gradients = tape.gradient(output.loss, weights.trainable)
        if proximal_strength > 0.0:
            gradients = tf.nest.map_structure(lambda g, w, w0: g + proximal_strength * (w - w0),
                                              gradients, weights.trainable, initial_weights.trainable)
        optimizer_state, updated = optimizer.next(
            optimizer_state, tuple(tf.nest.flatten(weights.trainable)), tuple(tf.nest.flatten(gradients)))
        tf.nest.map_structure(lambda v, t: v.assign(t), weights.trainable,
                              tf.nest.pack_sequence_as(weights.trainable, updated))
        return start + step, num_examples + tf.cast(output.num_examples, tf.int64), optimizer_state

    _, num_examples, _ = tf.while_loop(lambda start, num_examples, optimizer_state: start < steps_end, sgd_step,
                                       (tf.constant(0), tf.zeros([], tf.int64), optimizer_state))
    update = tf.nest.map_structure(tf.subtract, initial_weights.trainable, weights.trainable)
    # As TFF's client work: a non-finite update is sent as zeros, with weight 0 and no metrics.
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(update)])

    def sent():
        weight = tf.cast(num_examples, tf.float32) if weighted else tf.constant(1.0, tf.float32)
        return update, weight

    def dropped():
        untraced(model.reset_metrics)()
        return tf.nest.map_structure(tf.zeros_like, update), tf.constant(0.0, tf.float32)

    update, weight = tf.cond(finite, sent, dropped)
    return (tff.learning.templates.ClientResult(update=update, update_weight=weight),
            untraced(model.report_local_unfinalized_metrics)())


def build_prepared_client_work(model_fn: Callable[[], tff.learning.models.VariableModel],
                               optimizer: tff.learning.optimizers.Optimizer, batch_size: int,
                               weighted: bool = True, proximal_strength: float = 0.0, read_files: bool = False,
                               ) -> tff.learning.templates.ClientWorkProcess:
    """TFF's `build_model_delta_client_work` (example-weighted, or uniform when not `weighted`), reading
    prepared tensors; with `proximal_strength`, FedProx's client work.

    The training step, the non-finite guard and the metrics are the same as TFF's; only the loop
    differs (`train_on_prepared`), so no tf.data runs in the worker.
    """
    with tf.Graph().as_default():
        whimsy_model = model_fn()
        metrics_aggregation_fn = tff.learning.metrics.sum_then_finalize(unconverted_finalizers(whimsy_model))
    weights_type = tff.learning.models.weights_type_from_model(whimsy_model)
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(FILES_SPEC if read_files else PREPARED_SPEC))
    initial_hparams = optimizer.get_hparams(optimizer.initialize(tf.TensorSpec((), tf.float32)))

    @tff.federated_computation
    def init_fn():
        return tff.federated_value(initial_hparams, tff.SERVER)

    hparams_type = init_fn.type_signature.result.member

    @tff.tensorflow.computation(hparams_type, weights_type, data_type)
    def client_update(hparams, initial_weights, prepared_sequence):
        model = model_fn()
        prepared = prepared_sequence.get_single_element()
        if read_files:
            prepared = read_prepared(prepared)

        # AutoGraph off: the loop is TensorFlow's own (`train_on_prepared`).
        @tf.function(autograph=False)
        def train():
            return train_on_prepared(model, optimizer, hparams, initial_weights, prepared, batch_size, weighted,
                                     proximal_strength)

        return train()

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(weights_type, tff.CLIENTS),
                               tff.FederatedType(data_type, tff.CLIENTS))
    def next_fn(state, weights, client_data):
        client_result, model_outputs = tff.federated_map(
            client_update, (tff.federated_broadcast(state), weights, client_data))
        measurements = tff.federated_zip(OrderedDict(train=metrics_aggregation_fn(model_outputs)))
        return tff.templates.MeasuredProcessOutput(state, client_result, measurements)

    @tff.tensorflow.computation(hparams_type)
    def get_hparams_fn(state):
        return state

    @tff.tensorflow.computation(hparams_type, hparams_type)
    def set_hparams_fn(state, hparams):
        del state
        return hparams

    return tff.learning.templates.ClientWorkProcess(
        init_fn, next_fn, get_hparams_fn=get_hparams_fn, set_hparams_fn=set_hparams_fn)


def build_prepared_fed_avg(model_fn: Callable[[], tff.learning.models.VariableModel],
                           client_optimizer: tff.learning.optimizers.Optimizer,
                           server_optimizer: tff.learning.optimizers.Optimizer,
                           batch_size: int, model_aggregator=None, weighted: bool = True,
                           proximal_strength: float = 0.0, read_files: bool = False,
                           ) -> tff.learning.templates.LearningProcess:
    """`build_weighted_fed_avg` (`build_unweighted_fed_avg` when not `weighted`; FedProx with
    `proximal_strength`) with the prepared-tensor client work; TFF's components otherwise.

    `model_aggregator`: a weighted aggregation factory (an unweighted one when not `weighted`); None is
    TFF's mean, as in its builders.
    """

    @tff.tensorflow.computation
    def initial_model_weights_fn():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    weights_type = initial_model_weights_fn.type_signature.result
    factory = model_aggregator or (tff.aggregators.MeanFactory() if weighted else tff.aggregators.UnweightedMeanFactory())
    if not weighted:  # as `build_unweighted_fed_avg` does: the uniform client weights are then ignored
        factory = tff.aggregators.as_weighted_aggregator(factory)
    aggregator = factory.create(weights_type.trainable, tff.TensorType(np.float32))
    return tff.learning.templates.compose_learning_process(
        initial_model_weights_fn,
        tff.learning.templates.build_broadcast_process(weights_type),
        build_prepared_client_work(model_fn, client_optimizer, batch_size, weighted, proximal_strength, read_files),
        aggregator,
        tff.learning.templates.build_apply_optimizer_finalizer(server_optimizer, weights_type))


# --- Step 4, fast: federated evaluation on prepared tensors ------------------------------------------------

def evaluate_on_prepared(model: tff.learning.models.VariableModel, weights, prepared: OrderedDict,
                         batch_size: int) -> OrderedDict:
    """One client's unfinalized metrics for `weights`, as TFF's `build_fed_eval` computes them: a forward pass
    (not training) over each batch `order[i:i + batch_size]` (the whole client when `batch_size` is 0).
    TensorFlow's own loop, traced without AutoGraph, like `train_on_prepared`."""
    model_weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, t: v.assign(t), model_weights, weights)
    order = prepared["order"]
    step = tf.constant(batch_size) if batch_size else tf.maximum(tf.reduce_max(order) + 1, 1)

    def forward(start):
        indices = order[start:start + step]
        batch = OrderedDict(x=tf.gather(prepared["x"], indices), y=tf.gather(prepared["y"], indices))
        untraced(model.forward_pass)(batch, training=False)
        return (start + step,)

    tf.while_loop(lambda start: start < tf.size(order), forward, (tf.constant(0),))
    return untraced(model.report_local_unfinalized_metrics)()


class PreparedEvaluation(typing.NamedTuple):
    """`evaluate(weights, client_inputs)`: the clients' unfinalized metrics, summed (TFF's `federated_sum`);
    `finalize(sums)`: the model's metric finalizers applied to them. Together they are TFF's
    `sum_then_finalize` aggregation, split so that sums over several calls (groups of clients) add up."""
    evaluate: tff.Computation
    finalize: tff.Computation


def build_prepared_fed_eval(model_fn: Callable[[], tff.learning.models.VariableModel],
                            batch_size: int, read_files: bool = False) -> PreparedEvaluation:
    """`build_fed_eval`'s evaluation of global weights on the clients' data (broadcast, a forward pass per
    batch on each client, metrics summed and finalized at the server), reading prepared tensors (with
    `read_files`, from the files `PreparedClients(files_dir=...)` wrote, as the training does)."""
    with tf.Graph().as_default():
        whimsy_model = model_fn()
        finalizers = unconverted_finalizers(whimsy_model)
    weights_type = tff.learning.models.weights_type_from_model(whimsy_model)
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(FILES_SPEC if read_files else PREPARED_SPEC))

    @tff.tensorflow.computation(weights_type, data_type)
    def client_eval(weights, prepared_sequence):
        model = model_fn()
        prepared = prepared_sequence.get_single_element()
        if read_files:
            prepared = read_prepared(prepared)

        @tf.function(autograph=False)
        def evaluate():
            return evaluate_on_prepared(model, weights, prepared, batch_size)

        return evaluate()

    @tff.federated_computation(tff.FederatedType(weights_type, tff.SERVER), tff.FederatedType(data_type, tff.CLIENTS))
    def evaluate(weights, client_data):
        return tff.federated_sum(tff.federated_map(client_eval, (tff.federated_broadcast(weights), client_data)))

    @tff.tensorflow.computation(client_eval.type_signature.result)
    def finalize(sums):
        return OrderedDict((name, finalizer(sums[name])) for name, finalizer in finalizers.items())

    return PreparedEvaluation(evaluate, finalize)
