"""The benchmark: the package's training path beside a plain-TensorFlow floor, in one process.

    python -m fedmnist.bench [--workload tutorial|cnn|scale ...] [--json FILE]

For each workload it runs the package's round loop (`fedmnist.loop.train`) and a floor that performs
the same SGD steps on the same batches in plain TensorFlow (no FL framework), and prints for each:
median steady-state seconds per round (rounds after the first, the evaluating last round excluded),
round-1 seconds, training examples per second, the peak RSS of the whole process tree (this process
and its TFF workers, sampled), and the final training accuracy; then the ratio package/floor and
whether their final accuracies agree. `tutorial` also times the whole default run
(`python -m fedmnist.train`) against the bare TFF tutorial script on the same data, both as fresh
processes; `cnn` also runs the package under one core (affinity) and under all cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

WORKLOADS = ("tutorial", "cnn", "scale")
DEFAULT_WORKLOADS = ("tutorial", "cnn")
AGREEMENT_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class Workload:
    overrides: tuple[str, ...]
    paths: tuple[str, ...]          # package variants measured in this process
    note: str
    measure_float_noise: bool = True  # run the floor again from weights one ulp away (see run_floor)


WORKLOAD_SPECS = {
    "tutorial": Workload(
        ("data.dataset=digits",),
        ("tff-datasets", "prepared", "prepared-2-workers"),
        "linear model, first 10 of 20 IID digits clients every round, 5 epochs, batch 20, 10 rounds"),
    "cnn": Workload(
        ("model=cnn", "data.dataset=synthetic", "data.num_clients=500", "clients_per_round=50",
         "client_selection=uniform", "rounds=5", "client_optimizer.learning_rate=0.05"),
        ("prepared", "prepared-2-workers"),
        "CNN, 50 of 500 synthetic clients (40 train examples each) per round, 5 epochs, batch 20, 5 rounds"),
    "scale": Workload(
        ("data.dataset=synthetic", "data.num_clients=3383", "clients_per_round=100",
         "client_selection=uniform", "rounds=200",
         "eval_clients=100"),
        ("prepared",),
        "linear model, 100 of 3,383 synthetic clients sized like federated EMNIST per round, 200 rounds",
        measure_float_noise=False),
}
PATH_OVERRIDES = {
    "tff-datasets": ("client_input=datasets",),
    "prepared": ("client_input=prepared",),
    "prepared-2-workers": ("client_input=prepared", "num_workers=2"),
}


# --- Memory of the whole process tree ----------------------------------------------------------

class TreeMemory:
    """Samples the RSS of a process and all its descendants in a background thread."""

    def __init__(self, pid: int | None = None, interval: float = 0.02):
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        total = 0
        try:
            processes = [self.root] + self.root.children(recursive=True)
        except self._psutil.Error:
            return 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


# --- Figures ---------------------------------------------------------------------------------

def summarize(round_seconds: list[float], examples_per_round: float, peak_rss: int,
              final_accuracy: float, per_round: list[dict], evaluated_last: bool = True) -> dict:
    steady = round_seconds[1:-1] if evaluated_last and len(round_seconds) > 2 else round_seconds[1:]
    steady = steady or round_seconds
    median = statistics.median(steady)
    return {"steady_s_per_round": median, "round1_s": round_seconds[0],
            "examples_per_s": examples_per_round / median if median else float("nan"),
            "peak_rss_gb": peak_rss / 1e9, "final_accuracy": final_accuracy,
            "rounds": len(round_seconds), "per_round": per_round}


# --- The package's path ------------------------------------------------------------------------

@contextlib.contextmanager
def _population(dataset) -> Iterator[None]:
    """Makes `loop.train` use `dataset` (the scale workload's generated population)."""
    from fedmnist import loop

    if dataset is None:
        yield
        return
    original = loop.load_dataset
    loop.load_dataset = lambda cfg, seed: dataset
    try:
        yield
    finally:
        loop.load_dataset = original


def run_package(config, dataset=None) -> dict:
    from fedmnist import loop, runtime

    rss_by_round: dict[int, int] = {}
    workers_rss_by_round: dict[int, int] = {}
    with TreeMemory() as memory, tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as run_dir, \
            _population(dataset):
        def echo(line: str) -> None:
            if line.startswith("round"):
                round_num = int(line.split(",")[0].split()[1])
                rss_by_round[round_num] = memory.current()
                workers_rss_by_round[round_num] = rss_by_round[round_num] - memory.root.memory_info().rss

        loop.train(config, Path(run_dir), echo=echo, progress=False)
        rows = loop.MetricsLog(Path(run_dir)).rows()
    leftover = runtime.worker_children()
    if leftover:
        raise RuntimeError(f"worker_binary processes left running: {leftover}")
    per_round = [{"loss": r["train"]["loss"], "accuracy": r["train"]["sparse_categorical_accuracy"]}
                 for r in rows]
    figures = summarize([r["seconds"] for r in rows], rows[-1]["train"]["num_examples"], memory.peak,
                        per_round[-1]["accuracy"], per_round)
    figures["rss_gb_by_round"] = {k: v / 1e9 for k, v in sorted(rss_by_round.items())}
    figures["workers_rss_gb_by_round"] = {k: v / 1e9 for k, v in sorted(workers_rss_by_round.items())}
    return figures


# --- The floor: plain TensorFlow, same batches, same SGD steps ----------------------------------

def _selector(config, client_ids):
    """Each round's clients, as the package's loop picks them (fedmnist.participation)."""
    from fedmnist.participation import Participation

    participation = Participation(config, client_ids)
    return lambda round_num: participation.plan(round_num).completed


def run_floor(config, dataset=None, nudge_weights: bool = False) -> dict:
    """FedAvg with client SGD and server SGD in plain TensorFlow over the prepared batches.

    `nudge_weights` moves every initial weight by one float32 step (ulp): the run then measures how far
    float32 rounding alone moves this workload's trajectory, the yardstick for "agree".
    """
    import numpy as np
    import tensorflow as tf

    from fedmnist import data, loop, model, prepared

    if config.client_optimizer.name != "sgd" or config.server_optimizer.name != "sgd" or \
            config.client_optimizer.momentum or config.server_optimizer.momentum:
        raise ValueError("the floor implements plain SGD on clients and server only")
    with TreeMemory() as memory:
        tf.keras.utils.set_random_seed(config.seed)
        dataset = dataset or data.load_dataset(config.data, config.seed)
        select = _selector(config, dataset.train.client_ids)
        kwargs = loop.preprocess_kwargs(config)
        cache = prepared.prepared_clients(config, dataset.train, kwargs)   # the same prepared batches
        keras_model = model.create_model(config.model, dataset.num_classes)
        global_weights = model.initial_weights(config.model, dataset.num_classes, config.seed).trainable
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy()
        batch_size, client_lr = config.preprocess.batch_size, config.client_optimizer.learning_rate

        variables = keras_model.trainable_variables

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
                    variable.assign_sub(client_lr * gradient)
                count = tf.cast(tf.size(indices), tf.float32)
                loss_sum += loss * count
                hits = tf.equal(tf.argmax(predictions, axis=-1, output_type=tf.int32), yb[:, 0])
                correct += tf.reduce_sum(tf.cast(hits, tf.float32))
            examples = tf.cast(tf.size(order), tf.float32)
            deltas = [examples * (w - v) for w, v in zip(start_weights, variables)]
            return deltas, examples, loss_sum, correct

        @functools.lru_cache(maxsize=512)   # each client's prepared batches, built once and reused
        def client_tensors(client_id: str) -> dict:
            return cache.dataset(client_id).get_single_element()

        if nudge_weights:
            global_weights = [np.nextafter(w, np.float32(np.inf)) for w in global_weights]
        global_weights = [tf.constant(w) for w in global_weights]
        server_lr = config.server_optimizer.learning_rate
        seconds, per_round = [], []
        for round_num in range(1, config.rounds + 1):
            started = time.perf_counter()
            totals = None
            for client_id in select(round_num):
                arrays = client_tensors(client_id)
                result = train_client(global_weights, arrays["x"], arrays["y"], arrays["order"])
                totals = result if totals is None else tf.nest.map_structure(tf.add, totals, result)
            deltas, examples, loss_sum, correct = totals
            global_weights = [w - server_lr * d / examples for w, d in zip(global_weights, deltas)]
            examples = float(examples)
            per_round.append({"loss": float(loss_sum) / examples, "accuracy": float(correct) / examples})
            seconds.append(time.perf_counter() - started)
    return summarize(seconds, examples, memory.peak, per_round[-1]["accuracy"], per_round,
                     evaluated_last=False)


# --- Whole runs as fresh processes -------------------------------------------------------------

# fedmnist.runtime runs TFF's worker with one thread per op (faster, see there); "0" gives the bare
# script TensorFlow's own default, as TFF's default context would.
STOCK_WORKER_ENV = {"TF_NUM_INTRAOP_THREADS": "0"}

# The article's code as a bare script (its training and evaluation sections) on the package's digits
# clients. Two lines differ from the article: the data source, and a global seed so its shuffle order
# (hence its numbers) equals the package's. TFF's own default context would leave its worker_binary
# running after the script exits, so the worker is hosted by fedmnist.runtime, which is the same
# SyncExecutionContext over the same worker_binary, run with TFF's thread settings (STOCK_WORKER_ENV).
BARE_TUTORIAL_SCRIPT = '''
import collections
import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from fedmnist import data, runtime

tf.keras.utils.set_random_seed(0)
population = data.load_digits(num_clients=20)
emnist_train, emnist_test = population.train, population.test

NUM_CLIENTS = 10
NUM_EPOCHS = 5
BATCH_SIZE = 20
SHUFFLE_BUFFER = 100
PREFETCH_BUFFER = 10

def preprocess(dataset):
  def batch_format_fn(element):
    return collections.OrderedDict(
        x=tf.reshape(element['pixels'], [-1, 784]),
        y=tf.reshape(element['label'], [-1, 1]))
  return dataset.repeat(NUM_EPOCHS).shuffle(SHUFFLE_BUFFER, seed=1).batch(
      BATCH_SIZE).map(batch_format_fn).prefetch(PREFETCH_BUFFER)

def make_federated_data(client_data, client_ids):
  return [preprocess(client_data.create_tf_dataset_for_client(x)) for x in client_ids]

sample_clients = emnist_train.client_ids[0:NUM_CLIENTS]
federated_train_data = make_federated_data(emnist_train, sample_clients)
preprocessed_example_dataset = federated_train_data[0]

def create_keras_model():
  return tf.keras.models.Sequential([
      tf.keras.layers.InputLayer(input_shape=(784,)),
      tf.keras.layers.Dense(10, kernel_initializer='zeros'),
      tf.keras.layers.Softmax(),
  ])

def model_fn():
  keras_model = create_keras_model()
  return tff.learning.models.from_keras_model(
      keras_model,
      input_spec=preprocessed_example_dataset.element_spec,
      loss=tf.keras.losses.SparseCategoricalCrossentropy(),
      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

with runtime.local_runtime():
  training_process = tff.learning.algorithms.build_weighted_fed_avg(
      model_fn,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.02),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=1.0))
  train_state = training_process.initialize()
  result = training_process.next(train_state, federated_train_data)
  train_state = result.state
  print('round  1, metrics={}'.format(result.metrics['client_work']['train']))
  NUM_ROUNDS = 11
  for round_num in range(2, NUM_ROUNDS):
    result = training_process.next(train_state, federated_train_data)
    train_state = result.state
    print('round {:2d}, metrics={}'.format(round_num, result.metrics['client_work']['train']))

  evaluation_process = tff.learning.algorithms.build_fed_eval(model_fn)
  evaluation_state = evaluation_process.initialize()
  model_weights = training_process.get_model_weights(train_state)
  evaluation_state = evaluation_process.set_model_weights(evaluation_state, model_weights)
  evaluation_output = evaluation_process.next(evaluation_state, federated_train_data)
  print(evaluation_output.metrics['client_work']['eval']['current_round_metrics'])
  federated_test_data = make_federated_data(emnist_test, sample_clients)
  evaluation_output = evaluation_process.next(evaluation_state, federated_test_data)
  print(evaluation_output.metrics['client_work']['eval']['current_round_metrics'])
'''


def time_process(command: list[str], cpus: set[int] | None = None, env: dict[str, str] | None = None) -> dict:
    """Wall time, CPU time (its own and its reaped children's, i.e. its TFF workers'), and peak tree
    RSS of a fresh process. CPU seconds are less disturbed than wall time by other load on the machine."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        # No preexec_fn: Python code between fork and exec can deadlock on a lock that one of this
        # process's threads (gRPC's, TreeMemory's) held at the fork. The affinity is set right after.
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True,
                                   env=dict(os.environ) | (env or {}))
        if cpus is not None:
            os.sched_setaffinity(process.pid, cpus)
        with TreeMemory(process.pid) as memory:
            _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({process.returncode}): {stderr.strip()[-500:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": memory.peak / 1e9, "stdout": stdout}


def whole_runs(repeats: int) -> dict:
    """`python -m fedmnist.train` (default config) vs the bare tutorial script, interleaved."""
    results: dict[str, list] = {"package_default_run": [], "bare_tutorial_script": []}
    with tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as scratch:
        for i in range(repeats):
            run = time_process([sys.executable, "-m", "fedmnist.train", "--quiet", "--run-dir",
                                str(Path(scratch) / f"run{i}")])
            results["package_default_run"].append(run)
            results["bare_tutorial_script"].append(
                time_process([sys.executable, "-c", BARE_TUTORIAL_SCRIPT], env=STOCK_WORKER_ENV))
    out = {}
    for name, runs in results.items():
        out[name] = {"seconds": statistics.median(r["seconds"] for r in runs),
                     "all_seconds": [r["seconds"] for r in runs],
                     "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                     "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                     "last_lines": runs[-1]["stdout"].strip().splitlines()[-3:]}
    return out


def core_scaling(workload: str, extra: tuple[str, ...] = ()) -> dict:
    """The package path and the floor of `workload` in fresh processes pinned to one core, then to all."""
    all_cpus = os.sched_getaffinity(0)
    out = {}
    with tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as scratch:
        for label, cpus in (("one_core", {min(all_cpus)}), ("all_cores", all_cpus)):
            json_path = Path(scratch) / f"{label}.json"
            time_process([sys.executable, "-m", "fedmnist.bench", "--workload", workload, "--paths",
                          "prepared", "--no-cores", "--no-float-noise", "--json", str(json_path)]
                         + [f"--set={e}" for e in extra], cpus=cpus)
            figures = json.loads(json_path.read_text())[workload]
            out[label] = {"cpus": len(cpus), "steady_s_per_round": figures["prepared"]["steady_s_per_round"],
                          "examples_per_s": figures["prepared"]["examples_per_s"],
                          "floor_steady_s_per_round": figures["floor"]["steady_s_per_round"]}
    out["speedup"] = out["one_core"]["steady_s_per_round"] / out["all_cores"]["steady_s_per_round"]
    out["floor_speedup"] = (out["one_core"]["floor_steady_s_per_round"]
                            / out["all_cores"]["floor_steady_s_per_round"])
    return out


# --- The scale workload's population ---------------------------------------------------------

def scale_population(num_clients: int = 3383, seed: int = 0):
    """Synthetic clients whose sizes follow federated EMNIST's (mean ~101 train examples, long tail).

    Each client's examples are generated from its index when its dataset is built, so the
    population itself takes no memory and the benchmark sees only the training path's.
    """
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedmnist.data import FederatedDataset, examples_dataset

    rng = np.random.default_rng(seed)
    sizes = np.clip(rng.lognormal(mean=np.log(90), sigma=0.5, size=num_clients), 10, 460).astype(np.int64)
    prototypes = rng.uniform(0.0, 1.0, size=(10, 28, 28)).astype(np.float32)
    ids = [f"client_{i:04d}" for i in range(num_clients)]
    index = {cid: i for i, cid in enumerate(ids)}

    def client_fn(split: int) -> Callable[[str], tf.data.Dataset]:
        def dataset_fn(client_id: str) -> tf.data.Dataset:
            i = index[client_id]
            n = int(sizes[i]) if split == 0 else max(2, int(sizes[i]) // 8)
            client_rng = np.random.default_rng([seed, i, split])
            labels = client_rng.integers(0, 10, size=n).astype(np.int32)
            noise = client_rng.normal(0.0, 0.9, size=(n, 28, 28)).astype(np.float32)
            pixels = np.clip(prototypes[labels] + noise, 0.0, 1.0)
            return examples_dataset(OrderedDict(label=labels, pixels=pixels))
        return dataset_fn

    train = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(ids, client_fn(0))
    test = tff.simulation.datasets.ClientData.from_clients_and_tf_fn(ids, client_fn(1))
    return FederatedDataset("synthetic-emnist-sized", train, test, 10), int(sizes.sum())


# --- What TFF offers, measured on the tutorial workload (--explore) -----------------------------

def _digits_dataset_computation(client_data, client_ids: list[str], preprocess_kwargs: dict, seed: int):
    """A `tff.Computation` from a client id to its preprocessed dataset, built inside the worker
    (for `tff.simulation.compose_dataset_computation_with_learning_process`). The clients' examples
    are embedded in the computation, as a cached ClientData's `dataset_computation` would read them."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedmnist.data import preprocess

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
        return preprocess(tf.data.Dataset.from_tensor_slices(examples), **preprocess_kwargs)

    return dataset_computation


def explore(rounds: int = 12, repeats: int = 2, log: Callable[[str], None] = print) -> dict:
    """Round times of the ways TFF can run the tutorial workload, and whether each keeps its numbers."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedmnist import config as config_lib
    from fedmnist import data, loop, model, prepared, process, runtime

    config = config_lib.load(None, ["data.dataset=digits"])
    dataset = data.load_dataset(config.data, config.seed)
    select = _selector(config, dataset.train.client_ids)
    kwargs = loop.preprocess_kwargs(config)
    model_fn = model.build_model_fn(config.model, dataset.num_classes)
    opt = lambda cfg: process.build_optimizer(cfg)  # noqa: E731
    iterator = tff.learning.LoopImplementation.DATASET_ITERATOR
    articles = lambda ids: data.make_federated_data(dataset.train, ids, **kwargs)  # noqa: E731

    def fed_avg(**extra):
        return tff.learning.algorithms.build_weighted_fed_avg(
            model_fn, opt(config.client_optimizer), opt(config.server_optimizer), **extra)

    def composed():
        computation = _digits_dataset_computation(dataset.train, list(dataset.train.client_ids), kwargs,
                                                  config.seed)
        return tff.simulation.compose_dataset_computation_with_learning_process(computation, fed_avg())

    def prepared_process():
        return prepared.build_prepared_fed_avg(model_fn, opt(config.client_optimizer),
                                               opt(config.server_optimizer), config.preprocess.batch_size)

    # name: (process builder, client input, runtime settings)
    variants = {
        "article: build_weighted_fed_avg, tf.data each round": (fed_avg, articles, {}),
        "+ worker max_concurrent_computation_calls=1": (fed_avg, articles, {"max_calls": 1}),
        "+ worker max_concurrent_computation_calls=2": (fed_avg, articles, {"max_calls": 2}),
        "+ context default_num_clients=10": (fed_avg, articles, {"default_num_clients": 10}),
        "+ LoopImplementation.DATASET_ITERATOR": (lambda: fed_avg(loop_implementation=iterator), articles, {}),
        "compose_dataset_computation (datasets built in the worker)": (composed, lambda ids: list(ids), {}),
        "prepared tensors (package default)": (prepared_process, None, {}),
        "prepared tensors, 2 local workers": (prepared_process, None, {"workers": 2}),
    }
    results, reference = {}, None
    for repeat, (name, (build, feed, settings)) in ((r, v) for r in range(repeats) for v in variants.items()):
        log(f"[explore {repeat + 1}/{repeats}] {name}")
        workers = [runtime.loopback_worker(max_concurrent_computation_calls=settings.get("max_calls", -1))
                   for _ in range(settings.get("workers", 1))]
        stack = tff.framework.get_context_stack()
        previous = stack.current
        try:
            stubs = [w.connect() for w in workers]
            if len(stubs) == 1:
                context = tff.framework.SyncExecutionContext(
                    executor_fn=runtime._executor_factory(
                        stubs[0], default_num_clients=settings.get("default_num_clients", 0)),
                    compiler_fn=tff.backends.native.desugar_and_transform_to_native,
                    transform_args=tff.tensorflow.transform_args,
                    transform_result=tff.tensorflow.transform_result)
            else:
                context = runtime.multi_worker_context(stubs)
            stack.set_default_context(context)
            tf.keras.utils.set_random_seed(config.seed)
            learning_process = build()
            client_input = feed or prepared.prepared_clients(config, dataset.train, kwargs)
            state = learning_process.set_model_weights(
                learning_process.initialize(), model.initial_weights(config.model, dataset.num_classes, config.seed))
            seconds, per_round = [], []
            for round_num in range(1, rounds + 1):
                started = time.perf_counter()
                result = learning_process.next(state, client_input(select(round_num)))
                seconds.append(time.perf_counter() - started)
                state = result.state
                train = result.metrics["client_work"]["train"]
                per_round.append({"loss": float(train["loss"]),
                                  "accuracy": float(train["sparse_categorical_accuracy"])})
        finally:
            stack.set_default_context(previous)
            for w in workers:
                w.stop()
        reference = reference or per_round
        figures = results.setdefault(name, {"all_s_per_round": [], "max_metric_diff_vs_article": 0.0})
        figures["all_s_per_round"].append(statistics.median(seconds[1:]))
        figures["steady_s_per_round"] = min(figures["all_s_per_round"])
        figures["max_metric_diff_vs_article"] = max(figures["max_metric_diff_vs_article"],
                                                    _max_diff(reference, per_round))
    return results


def report_explore(results: dict) -> list[str]:
    base = next(iter(results.values()))["steady_s_per_round"]
    lines = ["== explore: the tutorial workload through each of TFF's options (process.next only; "
             "best of the repeats' medians)",
             f"{'variant':<62} {'s/round':>8} {'vs article':>10} {'metrics |diff|':>15}"]
    for name, f in results.items():
        lines.append(f"{name:<62} {f['steady_s_per_round']:>8.4f} {base / f['steady_s_per_round']:>9.1f}x "
                     f"{f['max_metric_diff_vs_article']:>15.1e}")
    return lines


# --- Running and printing ------------------------------------------------------------------

def bench_workload(name: str, paths: tuple[str, ...], floor: bool, whole_run_repeats: int,
                   cores: bool, log: Callable[[str], None], extra: tuple[str, ...] = (),
                   float_noise: bool = True) -> dict:
    from fedmnist import config as config_lib

    spec = WORKLOAD_SPECS[name]
    dataset, out = None, {"workload": spec.note}
    if name == "scale":
        dataset, total = scale_population()
        out["population_train_examples"] = total
    for path in paths:
        log(f"[{name}] package path: {path}")
        config = config_lib.load(None, list(spec.overrides) + list(PATH_OVERRIDES[path]) + list(extra))
        out[path] = run_package(config, dataset)
    if floor:
        log(f"[{name}] plain-TensorFlow floor")
        floor_config = config_lib.load(None, list(spec.overrides) + list(extra))
        out["floor"] = run_floor(floor_config, dataset)
        if float_noise and spec.measure_float_noise:
            log(f"[{name}] plain-TensorFlow floor, initial weights one ulp away (float32 noise)")
            out["floor_nudged"] = run_floor(floor_config, dataset, nudge_weights=True)
    if name == "tutorial" and whole_run_repeats:
        log(f"[{name}] whole runs as fresh processes ({whole_run_repeats}x each)")
        out["whole_run"] = whole_runs(whole_run_repeats)
    if name == "cnn" and cores:
        log(f"[{name}] one core vs all cores (fresh processes)")
        out["cores"] = core_scaling(name, extra)
    return out


def _max_diff(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "accuracy"))


def agreement_tolerance(figures: dict) -> tuple[float, float | None]:
    """The final-accuracy tolerance: 1e-6, or twice the float32 noise when that is larger.

    The noise is how far the floor's accuracy moves, at most over the rounds, when only its initial
    weights move by one ulp: a nonlinear model amplifies rounding differences round after round, and the
    worker's TensorFlow build rounds its kernels differently from this process's.
    """
    if "floor_nudged" not in figures:
        return AGREEMENT_TOLERANCE, None
    noise = max(abs(a["accuracy"] - b["accuracy"])
                for a, b in zip(figures["floor"]["per_round"], figures["floor_nudged"]["per_round"]))
    return max(AGREEMENT_TOLERANCE, 2 * noise), noise


def report(name: str, figures: dict) -> list[str]:
    lines = [f"== {name}: {figures['workload']}",
             f"{'path':<20} {'s/round':>9} {'round 1 s':>10} {'examples/s':>11} {'peak RSS GB':>12} {'final acc':>10}"]
    paths = [p for p in (*PATH_OVERRIDES, "floor") if p in figures]
    for path in paths:
        f = figures[path]
        lines.append(f"{path:<20} {f['steady_s_per_round']:>9.4f} {f['round1_s']:>10.3f} "
                     f"{f['examples_per_s']:>11,.0f} {f['peak_rss_gb']:>12.2f} {f['final_accuracy']:>10.6f}")
    if "floor" in figures:
        floor = figures["floor"]
        tolerance, noise = agreement_tolerance(figures)
        if noise is not None:
            lines.append(f"float32 noise: the floor from initial weights one ulp away moves its accuracy by up to "
                         f"{noise:.1e}; tolerance max(1e-6, 2 x noise) = {tolerance:.1e}")
        for path in paths[:-1]:
            f = figures[path]
            diff = abs(f["final_accuracy"] - floor["final_accuracy"])
            verdict = "agree" if diff <= tolerance else "DISAGREE"
            first_loss = abs(f["per_round"][0]["loss"] - floor["per_round"][0]["loss"])
            lines.append(f"{path} / floor: {f['steady_s_per_round'] / floor['steady_s_per_round']:.1f}x "
                         f"per round; final accuracy {verdict} with the floor (|diff| {diff:.1e} "
                         f"vs tolerance {tolerance:.1e}; round-1 loss |diff| {first_loss:.1e}, "
                         f"all rounds max {_max_diff(f['per_round'], floor['per_round']):.1e})")
    if "tff-datasets" in figures:
        for path in ("prepared", "prepared-2-workers"):
            if path in figures:
                diff = _max_diff(figures["tff-datasets"]["per_round"], figures[path]["per_round"])
                lines.append(f"{path} vs tff-datasets (the article's path): per-round loss/accuracy max "
                             f"|diff| {diff:.1e}; {figures['tff-datasets']['steady_s_per_round'] / figures[path]['steady_s_per_round']:.1f}x faster")
    if "prepared" in figures and "prepared-2-workers" in figures:
        lines.append(f"2 local workers vs 1: {figures['prepared']['steady_s_per_round'] / figures['prepared-2-workers']['steady_s_per_round']:.2f}x speed-up")
    if "whole_run" in figures:
        w = figures["whole_run"]
        pkg, bare = w["package_default_run"], w["bare_tutorial_script"]
        lines.append(f"whole run, fresh processes, median of {len(pkg['all_seconds'])}: `python -m fedmnist.train` "
                     f"{pkg['seconds']:.1f} s wall, {pkg['cpu_seconds']:.1f} s CPU, peak {pkg['peak_rss_gb']:.2f} GB; "
                     f"bare TFF tutorial script {bare['seconds']:.1f} s wall, {bare['cpu_seconds']:.1f} s CPU, "
                     f"peak {bare['peak_rss_gb']:.2f} GB: package "
                     f"{'no longer' if pkg['seconds'] <= bare['seconds'] else 'LONGER'} (wall), "
                     f"{'no longer' if pkg['cpu_seconds'] <= bare['cpu_seconds'] else 'LONGER'} (CPU)")
    if "cores" in figures:
        c = figures["cores"]
        lines.append(f"cores: one core {c['one_core']['steady_s_per_round']:.3f} s/round, "
                     f"{c['all_cores']['cpus']} cores {c['all_cores']['steady_s_per_round']:.3f} s/round: "
                     f"{c['speedup']:.2f}x (the floor: {c['one_core']['floor_steady_s_per_round']:.3f} vs "
                     f"{c['all_cores']['floor_steady_s_per_round']:.3f} s/round, {c['floor_speedup']:.2f}x)")
    for path in paths:
        rss = figures[path].get("rss_gb_by_round", {})
        if name == "scale" and 20 in rss:
            last = max(rss)
            # Medians over 5 rounds: a single sample swings with the round's transient buffers.
            window = lambda series, end: statistics.median(series[r] for r in range(end - 4, end + 1))  # noqa: E731
            early, late = window(rss, 20), window(rss, last)
            workers = figures[path]["workers_rss_gb_by_round"]
            lines.append(f"{path}: tree RSS {early:.3f} GB at rounds 16-20, {late:.3f} GB at rounds "
                         f"{last - 4}-{last} ({(late - early) / early * 100:+.1f}%; TFF workers "
                         f"{window(workers, 20):.3f} -> {window(workers, last):.3f} GB)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmnist.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=WORKLOADS,
                        help="tutorial and cnn by default; scale is opt-in (repeatable)")
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATH_OVERRIDES),
                        help="package variants to run (default: per workload)")
    parser.add_argument("--no-floor", action="store_true", help="skip the plain-TensorFlow floor")
    parser.add_argument("--whole-runs", type=int, default=2, metavar="N",
                        help="tutorial: time the whole default run and the bare script N times each (0 = skip)")
    parser.add_argument("--no-cores", action="store_true", help="cnn: skip the one-core vs all-cores runs")
    parser.add_argument("--no-float-noise", action="store_true",
                        help="skip the floor's second run from weights one ulp away (agreement tolerance 1e-6)")
    parser.add_argument("--explore", action="store_true",
                        help="also time TFF's options (worker concurrency, iterator loop, datasets built "
                             "in the worker, prepared tensors, 2 workers) on the tutorial workload")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every workload, e.g. --set rounds=20")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = {"load_average_at_start": os.getloadavg()[0], "cpus": len(os.sched_getaffinity(0))}
    print(f"machine: {results['cpus']} CPUs, load average {results['load_average_at_start']:.2f} at start", flush=True)
    for name in args.workload or (() if args.explore else DEFAULT_WORKLOADS):
        paths = tuple(args.paths or WORKLOAD_SPECS[name].paths)
        results[name] = bench_workload(name, paths, not args.no_floor, args.whole_runs,
                                       not args.no_cores, log, tuple(args.set), not args.no_float_noise)
        print("\n".join(report(name, results[name])), flush=True)
    if args.explore:
        results["explore"] = explore(log=log)
        print("\n".join(report_explore(results["explore"])), flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    print(f"load average {results['load_average_at_end']:.2f} at end (other processes on the machine "
          f"slow every figure above; ratios measured in the same process are the robust ones)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
