"""Everything a run needs, built and validated once from a config: `build(config, run_dir) -> Experiment`.

The config is read here and nowhere below the command line: the data source, the model, the algorithm and
the aggregation mode (each a registered component, fedmnist/registry.py), the training process, the
evaluations, client participation, checkpoints and outputs come out built. Validation that needs the data
or the model happens here too, before round 1, and raises the package's own errors (fedmnist/errors.py).
The round loop (`fedmnist.loop.run`) then plays the experiment's rounds and never sees the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import tensorflow as tf
import tensorflow_federated as tff
import yaml

from fedmnist import installed_versions, registry, runtime
from fedmnist.aggregation.base import AggregationMode, Training
from fedmnist.clients.participation import Participation
from fedmnist.clients.personalization import PersonalizationEvaluator
from fedmnist.config import Config, PreprocessConfig, to_dict
from fedmnist.data.preprocessing import Preprocessing, make_federated_data
from fedmnist.data.sources import load_dataset, pooled_test_set
from fedmnist.data.types import FederatedDataset
from fedmnist.errors import ConfigError
from fedmnist.evaluation import (EVALUATION_GROUP_BYTES, CentralizedEvaluator, Evaluations, FederatedEvaluator,
                                 PreparedFederatedEvaluator, PreparedSplit)
from fedmnist.model import build_model_fn, check_model, create_model, initial_weights, to_keras
from fedmnist.outputs import targets
from fedmnist.outputs.checkpoint import Checkpoints
from fedmnist.outputs.console import format_centralized, format_eval, format_final, format_personalization, format_targets
from fedmnist.outputs.metrics_log import MetricsLog, replace_atomically
from fedmnist.outputs import run_directory
from fedmnist.outputs.records import LOCAL_TRAINING, MEASUREMENTS, RoundRecord, measurement
from fedmnist.outputs.sink import SUMMARY_FILE, FinalResult, RunOutputs, run_outputs
from fedmnist.outputs.tensorboard import weight_names
from fedmnist.client_tensors import ExaminedClients, PreparedClients
from fedmnist.privacy.ledger import ReleaseLedger
from fedmnist.process import ProcessBuilder

CONFIG_FILE = "config.yaml"


@dataclasses.dataclass
class Experiment:
    """A run, built: what `loop.run` plays, round by round. A context manager: leaving it stops the workers."""

    run_dir: Path
    rounds: int
    dataset: FederatedDataset
    mode: AggregationMode
    training: Training
    participation: Participation
    evaluations: Evaluations
    outputs: RunOutputs
    checkpoints: Checkpoints
    workers: runtime.Runtime
    worker_retries: int
    initial_weights: tff.learning.models.ModelWeights
    keras_model: Callable[[tff.learning.models.ModelWeights], tf.keras.Model]
    personalize: Callable[[tff.learning.models.ModelWeights], dict | None]
    about: dict  # what summary.json says of the run's setting
    accuracy_targets: Sequence[float]
    stop_after_target: int | None
    echo: Callable[[str], None]
    resume: bool
    stack: contextlib.ExitStack
    created: float = dataclasses.field(default_factory=time.perf_counter)
    learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)  # as `start` read them

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc_info) -> None:
        self.training.close()
        self.outputs.close()
        self.stack.close()

    # --- What the loop asks -------------------------------------------------------------------

    def start(self) -> tuple[object, int]:
        """The seeded initial state, or when resuming the newest intact checkpoint's state and round (what
        the outputs hold of later rounds is dropped)."""
        process = self.training.process
        state = process.set_model_weights(process.initialize(), self.initial_weights)
        done = 0
        if self.resume:
            saved, done = self.checkpoints.load_latest(state, warn=self.echo)
            self.outputs.drop_after(done, self.echo)
            self.mode.resume([r.aggregation for r in MetricsLog(self.run_dir).records() if r.aggregation])
            self.echo(f"resuming after round {done}")
            state = state if saved is None else saved
        # Read once, not after every round (a call to the worker each time): TFF's optimizers keep their
        # learning rates as hparams, which `next` leaves as they are and only `set_hparams` changes.
        self.learning_rates = self.read_learning_rates(state)
        return state, done

    def weights_of(self, state) -> tff.learning.models.ModelWeights:
        return model_weights(self.training.process, state)

    def read_learning_rates(self, state) -> dict[str, float]:
        """The client and server learning rates held in the training state (TFF's hparams)."""
        from fedmnist.values import to_python

        hparams = to_python(self.training.process.get_hparams(state))
        parts = {"client": hparams.get("client_work", {}), "server": hparams.get("finalizer", {})}
        return {side: float(values["learning_rate"]) for side, values in parts.items() if "learning_rate" in values}

    def save_for_stop(self, state, round_num: int) -> int:
        """Checkpoints the state after `round_num` (unless it is saved already); returns `round_num`."""
        if round_num > 0 and round_num not in self.checkpoints.rounds():
            self.checkpoints.save(state, round_num)
        return round_num

    @property
    def centralized_test_set(self) -> str:
        """What the centralized evaluation runs on: a source's own test set (MNIST's), or one pooled from
        the clients' test data."""
        return "the server's own test set" if self.dataset.central_test is not None else "the pooled test set"

    @property
    def centralized_note(self) -> str:
        """MNIST's test set is the server's own; every other source's is pooled from the clients' test data,
        which a privacy guarantee does not cover."""
        return "" if self.dataset.central_test is not None else self.mode.not_covered

    def target_stop_due(self, round_num: int) -> bool:
        """Whether `stop_after_target` rounds have passed since the best test accuracy first reached the
        highest target (rounds to every target are then known exactly)."""
        if self.stop_after_target is None or not self.accuracy_targets:
            return False
        highest = max(self.accuracy_targets)
        reached = targets.summarize(MetricsLog(self.run_dir).records(), [highest])["targets"][f"{highest:g}"]
        return reached is not None and round_num >= math.ceil(reached) + self.stop_after_target

    def unfinished_end(self) -> tuple[RoundRecord, dict | None]:
        """When every round is done but the end of the run was interrupted (no summary.json): the last
        round's record and the last training metrics, from metrics.jsonl, to finish it again from."""
        records = MetricsLog(self.run_dir).records()
        if (self.run_dir / SUMMARY_FILE).exists() or not records or records[-1].round != self.rounds:
            raise ConfigError(f"the run already has {'its' if self.rounds == 1 else 'all'} "
                              f"{targets.count_rounds(self.rounds)}; "
                              f"pass --rounds with a larger number to continue it")
        self.echo(f"{'its' if self.rounds == 1 else 'all'} {targets.count_rounds(self.rounds)} "
                  f"{'is' if self.rounds == 1 else 'are'} done; finishing the run")
        last_train = next((r.train for r in reversed(records) if r.train), None)
        return records[-1], last_train

    def finish(self, last: RoundRecord, last_train: dict | None, weights: tff.learning.models.ModelWeights,
               resumed_after: int) -> dict:
        """The end of the run: personalization, the final evaluation's lines, and the outputs' finish
        (model, summary.json, curves); returns the summary."""
        personalized = self.personalize(weights)
        for split, metrics in (last.eval or {}).items():
            self.echo((format_centralized(metrics, self.centralized_test_set) + self.centralized_note) if split == "centralized"
                      else format_eval(split, metrics) + self.mode.not_covered)
        summary = self.about | {"resumed_after_round": resumed_after if self.resume else None,
                                 LOCAL_TRAINING.key: last_train}
        # The final evaluations, each under its name (metrics.jsonl keeps them under `eval`).
        summary |= {measured.key: last.eval[measured.path[1]] for measured in MEASUREMENTS
                    if measured.path[0] == "eval" and measured.path[1] in (last.eval or {})}
        if self.accuracy_targets:  # only when the config sets targets (McMahan et al.'s Table 2)
            reached = targets.summarize(MetricsLog(self.run_dir).records(), self.accuracy_targets)
            if reached["evaluation"] is not None:
                self.echo(format_targets(reached))
                reached["evaluation"] = measurement(reached["evaluation"]).key
            summary["rounds_to_target"] = reached
        if last.round < self.rounds:  # stopped by stop_after_target
            summary["stopped_after_target"] = {"round": last.round, "rounds_after": self.stop_after_target}
        summary |= {"personalization": personalized, "aggregation": self.mode.summary(),
                    "total_seconds": time.perf_counter() - self.created,
                    "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.outputs.finish(FinalResult(summary, weights, lambda: self.keras_model(weights)))
        if last.eval and "train" in last.eval and "test" in last.eval:
            self.echo(format_final(summary, self.mode.not_covered, self.run_dir))
        return summary


def model_weights(process, state) -> tff.learning.models.ModelWeights:
    """The global model's weights in `state`, as `process.get_model_weights` gives them.

    TFF's FedAvg state already holds them, in Python, once `next` returns; reading them there saves a
    call to the worker every round. Other processes' states go through `get_model_weights`.
    """
    weights = getattr(state, "global_model_weights", None)
    if isinstance(weights, tff.learning.models.ModelWeights):
        return weights
    return process.get_model_weights(state)


# --- Building it ----------------------------------------------------------------------------------

def build(config: Config, run_dir: Path, echo: Callable[[str], None] = print, resume: bool = False,
          dataset: FederatedDataset | None = None) -> Experiment:
    """Builds and checks everything `config` describes, into `run_dir` (which must exist); `dataset` replaces
    the configured source (the benchmark's generated populations). With `resume`, the run continues after
    the newest intact checkpoint in `run_dir`."""
    created = time.perf_counter()
    run_dir = Path(run_dir)
    mode = registry.AGGREGATIONS.get(config.aggregation)(config)
    algorithm = registry.ALGORITHMS.get(config.algorithm)(config)
    stack = contextlib.ExitStack()
    with contextlib.ExitStack() as on_failure:
        on_failure.enter_context(stack)
        stack.enter_context(run_directory.locked(run_dir))
        tf.keras.utils.set_random_seed(config.seed)
        dataset = dataset or load_dataset(config.data, config.seed)
        check_population(config, dataset)
        write_config(run_dir, config)
        echo(f"data: {dataset.name}, {len(dataset.train.client_ids)} clients, "
             f"{config.clients_per_round} per round, model: {config.model}")
        check_model(config.model, dataset.num_classes)
        model_fn = build_model_fn(config.model, dataset.num_classes)
        preprocessing = preprocessing_settings(config.preprocess)
        eval_ids = evaluation_clients(config.eval_clients, dataset.train.client_ids)
        # A local worker boots (about a second, in its own process) while the process is traced: it is ready
        # before round 1 (docs/performance.md, "Start-up").
        workers = stack.enter_context(runtime.local_runtime(
            log_path=run_dir / "worker.log", num_workers=config.num_workers, addresses=config.workers,
            timeout=config.worker_timeout_seconds))
        # Local workers read the prepared clients' examples from files of this user's (remote ones are sent them).
        files_dir = None if config.workers else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="fedmnist-clients-")))
        builder = process_builder(config, model_fn, algorithm, dataset.train, dataset.num_classes,
                                  f"{dataset.origin} (train split)", files_dir)
        mode.keep_releases(ReleaseLedger(run_dir))
        training = mode.build(builder)
        for line in (algorithm.describe(), mode.header()):
            if line:
                echo(line)
        checkpoints = Checkpoints(run_dir, keep=config.checkpoints_kept)
        # The federated evaluation is built when first needed (fedmnist/evaluation.py).
        run_evaluations = evaluations(config, model_fn, dataset, eval_ids, preprocessing.one_epoch(), files_dir)
        experiment = Experiment(
            run_dir=run_dir, rounds=config.rounds, dataset=dataset, mode=mode, training=training,
            participation=Participation(config, dataset.train.client_ids,
                                        mode.secret_sample_rate(len(dataset.train.client_ids))),
            evaluations=run_evaluations,
            outputs=run_outputs(run_dir, checkpoints, weight_names(create_model(config.model, dataset.num_classes)),
                                config.histogram_every, config.checkpoint_every, config.rounds,
                                (run_dir / CONFIG_FILE).read_text()),
            checkpoints=checkpoints, workers=workers, worker_retries=config.worker_retries,
            initial_weights=initial_weights(config.model, dataset.num_classes, config.seed),
            keras_model=lambda weights: to_keras(weights, config.model, dataset.num_classes),
            personalize=personalizer(config, model_fn, dataset, eval_ids, echo),
            about=about(config, dataset, eval_ids), accuracy_targets=config.accuracy_targets,
            stop_after_target=config.stop_after_target, echo=echo, resume=resume, stack=stack, created=created)
        on_failure.pop_all()
    return experiment


def process_builder(config: Config, model_fn, algorithm, client_data, num_classes: int | None = None,
                    origin: str = "the client data", files_dir: Path | None = None) -> ProcessBuilder:
    """The configured algorithm on the configured client input, for the aggregation mode to build from;
    with `num_classes`, prepared clients' examples are checked against it as they are read; with `files_dir`,
    local workers read them from files there."""
    return ProcessBuilder(model_fn, algorithm, config.client_optimizer, config.server_optimizer, client_data,
                          preprocessing_settings(config.preprocess), prepared=config.client_input == "prepared",
                          size_classes=config.client_selection != "fixed", num_classes=num_classes, origin=origin,
                          files_dir=files_dir)


def preprocessing_settings(settings: PreprocessConfig) -> Preprocessing:
    return Preprocessing(settings.epochs, settings.batch_size, settings.shuffle_buffer, settings.prefetch_buffer,
                         settings.shuffle_seed, per_round=settings.shuffle == "per_round")


def prepared_clients(config: Config, client_data: tff.simulation.datasets.ClientData) -> PreparedClients:
    """The prepared client inputs `config` trains on (what `client_input: prepared` feeds the process)."""
    return PreparedClients(client_data, preprocessing_settings(config.preprocess),
                           size_classes=config.client_selection != "fixed")


def check_population(config: Config, dataset: FederatedDataset) -> None:
    available = len(dataset.train.client_ids)
    if config.clients_per_round > available:
        raise ConfigError(f"clients_per_round: {config.clients_per_round} is more than the "
                          f"{available} clients of the {dataset.name} data")


def write_config(run_dir: Path, config: Config) -> None:
    resolved = to_dict(config)
    resolved["versions"] = installed_versions()
    replace_atomically(run_dir / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False).encode())


def evaluation_clients(count: int, client_ids: Sequence[str]) -> list[str]:
    """The first `count` clients (all when 0); with fixed selection these include the article's training
    clients."""
    ids = list(client_ids)
    return ids if count == 0 else ids[:count]


def evaluations(config: Config, model_fn, dataset: FederatedDataset, eval_ids: list[str],
                settings: Preprocessing, files_dir: Path | None = None) -> Evaluations:
    """The run's evaluations. The federated one (computations and client inputs) is built when first needed,
    not here (`Evaluations`); it reads the clients' data as training does (`client_input`): the article's
    pipelines, or prepared tensors visited in the same order (with `files_dir`, read by the worker from
    files there, in a directory of each split's own)."""
    splits = (("train", dataset.train), ("test", dataset.test))

    def federated_data() -> dict[str, list[tf.data.Dataset]]:
        for split, client_data in splits:  # read only in the worker otherwise (`ExaminedClients`)
            ExaminedClients(client_data, dataset.num_classes, f"{dataset.origin} ({split} split)")(eval_ids)
        return {split: make_federated_data(client_data, eval_ids, epochs=settings.epochs,
                                           batch_size=settings.batch_size, shuffle_buffer=settings.shuffle_buffer,
                                           prefetch_buffer=settings.prefetch_buffer, seed=settings.shuffle_seed)
                for split, client_data in splits}

    def prepared_data() -> dict[str, PreparedSplit]:
        # One order per client, the article's evaluation datasets' (built with `shuffle_seed` every time).
        fixed_order = dataclasses.replace(settings, per_round=False)
        # A cache as large as one group: a split that fits is read once per run, a larger one group by group
        # at each evaluation (an LRU cache smaller than a cyclic scan would only hold memory).
        return {split: PreparedSplit(PreparedClients(client_data, fixed_order, max_bytes=EVALUATION_GROUP_BYTES,
                                                     num_classes=dataset.num_classes,
                                                     origin=f"{dataset.origin} ({split} split)",
                                                     files_dir=split_files(split)), eval_ids)
                for split, client_data in splits}

    def split_files(split: str) -> Path | None:
        if files_dir is None:
            return None
        (files_dir / f"evaluation-{split}").mkdir(exist_ok=True)
        return files_dir / f"evaluation-{split}"

    federated = (PreparedFederatedEvaluator(model_fn, settings.batch_size, prepared_data,
                                            read_files=files_dir is not None)
                 if config.client_input == "prepared" else FederatedEvaluator(model_fn, federated_data))
    centralized = (None if config.centralized_eval_every is None
                   else CentralizedEvaluator(config.model, dataset.num_classes, *pooled_test_set(dataset)))
    return Evaluations(federated, config.eval_every, config.rounds, centralized, config.centralized_eval_every)


def personalizer(config: Config, model_fn, dataset: FederatedDataset, eval_ids: list[str],
                 echo: Callable[[str], None]) -> Callable[[tff.learning.models.ModelWeights], dict | None]:
    settings = config.personalization

    def personalize(weights: tff.learning.models.ModelWeights) -> dict | None:
        if not settings.enabled:
            return None
        clients = eval_ids[:settings.clients or None]
        result = PersonalizationEvaluator(model_fn, settings)(weights, dataset.train, dataset.test, clients)
        echo(format_personalization(result))
        return result

    return personalize


def about(config: Config, dataset: FederatedDataset, eval_ids: list[str]) -> dict:
    return {"dataset": dataset.name, "num_clients": len(dataset.train.client_ids),
            "clients_per_round": config.clients_per_round, "evaluation_clients": len(eval_ids),
            "rounds": config.rounds, "model": config.model, "algorithm": config.algorithm}
