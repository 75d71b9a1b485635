"""Step 5 of the article: the federated-averaging round loop, from a config to a trained model.

One round, as in the article: plan (select the round's clients), train (`process.next` on their
preprocessed data), check (a diverged loss stops the run), evaluate (federated evaluation every
`eval_every` rounds and at the end), record (one `RoundRecord`, released to `metrics.jsonl`,
TensorBoard and checkpoints). Set-up and the end of the run (model, summary, curves) sit around it.
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import yaml
from tqdm import tqdm

from fedmnist import config as config_lib
from fedmnist import installed_versions, runtime
from fedmnist.clients.participation import Participation, RoundPlan
from fedmnist.clients.personalization import PersonalizationEvaluator
from fedmnist.data.preprocessing import make_federated_data
from fedmnist.data.sources import FederatedDataset, load_dataset, pooled_test_set
from fedmnist.evaluation import CentralizedEvaluator, FederatedEvaluator
from fedmnist.model import build_model_fn, create_model, initial_weights, to_keras
from fedmnist.outputs import checkpoint as checkpoint_lib
from fedmnist.outputs import targets
from fedmnist.outputs.checkpoint import Checkpoints
from fedmnist.outputs.console import (format_centralized, format_eval, format_personalization, format_round,
                                      format_skipped, format_targets, is_finite_loss)
from fedmnist.outputs.metrics_log import MetricsLog, write_json
from fedmnist.outputs.records import RoundRecord, to_python
from fedmnist.outputs.sink import RunOutputs, run_outputs
from fedmnist.outputs.tensorboard import TensorBoardLog, drop_events_after, learning_rates, weight_names
from fedmnist.privacy.aggregation import Training, build_process

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); the state after `round_num` is saved."""

    def __init__(self, round_num: int):
        super().__init__(f"interrupted after round {round_num}")
        self.round_num = round_num


def _never() -> bool:
    return False


def train(config: config_lib.Config, run_dir: Path, echo: Callable[[str], None] = tqdm.write,
          progress: bool = True, resume: bool = False, stop_requested: Callable[[], bool] = _never,
          dataset: FederatedDataset | None = None) -> dict:
    """Runs the job into `run_dir` (which must exist) and returns the summary it writes.

    `dataset` replaces the configured data source (the benchmark's generated populations). With
    `resume`, training continues after the newest intact checkpoint in `run_dir`; what was logged
    after it is dropped first, so every round appears exactly once. `stop_requested` is polled
    between rounds: when it returns True the state is checkpointed and `Interrupted` is raised.
    A lost worker is restarted and its round repeated (`worker_retries`); past that, or for a lost
    remote worker, the state is checkpointed and `WorkerFailedError` raised.
    """
    started = time.perf_counter()
    run = prepare_run(config, Path(run_dir), echo, dataset)
    with runtime.local_runtime(log_path=run.run_dir / "worker.log", num_workers=config.num_workers,
                               addresses=config.workers, timeout=config.worker_timeout_seconds) as workers:
        training = build_process(config, run.model_fn, run.dataset.train, preprocess_kwargs(config))
        if header := training.report.header():
            echo(header)
        evaluator = FederatedEvaluator(run.model_fn)
        _import_while_waiting("fedmnist.outputs.plots")
        state, done = starting_state(run, training.process, resume, echo)
        outputs = open_outputs(run, fresh=done == 0)
        weights, record, last_train = model_weights(training.process, state), None, None
        bar = tqdm(range(done + 1, config.rounds + 1), desc="rounds", unit="round", initial=done,
                   total=config.rounds, disable=not progress or None)
        for round_num in bar:
            if stop_requested():
                raise Interrupted(save_for_stop(run.checkpoints, state, round_num - 1))
            round_started = time.perf_counter()
            try:
                record, state, weights = recovering(
                    workers, config.worker_retries, round_num, echo,
                    lambda: play_round(run, training, evaluator, state, weights, round_num, echo))
            except WorkerFailedError as error:
                error.saved_round = save_for_stop(run.checkpoints, state, round_num - 1)
                raise
            if record.train:
                last_train = record.train
                bar.set_postfix(loss=last_train["loss"], acc=last_train["sparse_categorical_accuracy"])
            record.seconds = time.perf_counter() - round_started
            outputs.release(record, state, weights)
        personalized = personalize(run, weights, echo) if record else None
        outputs.close()
    if record is None:
        raise config_lib.ConfigError(f"the run already has all {config.rounds} rounds; "
                                     f"pass --rounds with a larger number to continue it")
    return finish(run, training, record, last_train, weights, personalized, done if resume else None,
                  time.perf_counter() - started, echo)


# --- Set-up ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """What a run holds before its first round."""

    config: config_lib.Config
    run_dir: Path
    dataset: FederatedDataset
    model_fn: Callable[[], tff.learning.models.VariableModel]
    participation: Participation
    eval_ids: list[str]
    eval_data: dict[str, list[tf.data.Dataset]]
    checkpoints: Checkpoints
    centralized: CentralizedEvaluator | None = None  # with `centralized_eval_every` set


def prepare_run(config: config_lib.Config, run_dir: Path, echo: Callable[[str], None],
                dataset: FederatedDataset | None = None) -> Run:
    """Seeds, data, model, client selection and evaluation data; writes the resolved config."""
    tf.keras.utils.set_random_seed(config.seed)
    dataset = dataset or load_dataset(config.data, config.seed)
    check_population(config, dataset)
    write_config(run_dir, config)
    echo(f"data: {dataset.name}, {len(dataset.train.client_ids)} clients, "
         f"{config.clients_per_round} per round, model: {config.model}")
    eval_ids = evaluation_clients(config, dataset.train.client_ids)
    eval_data = {split: make_federated_data(client_data, eval_ids, **preprocess_kwargs(config, epochs=1))
                 for split, client_data in (("train", dataset.train), ("test", dataset.test))}
    return Run(config, run_dir, dataset, build_model_fn(config.model, dataset.num_classes),
               Participation(config, dataset.train.client_ids), eval_ids, eval_data,
               Checkpoints(run_dir, keep=config.checkpoints_kept), centralized_evaluator(config, dataset))


def centralized_evaluator(config: config_lib.Config, dataset: FederatedDataset) -> CentralizedEvaluator | None:
    if config.centralized_eval_every is None:
        return None
    return CentralizedEvaluator(config.model, dataset.num_classes, *pooled_test_set(dataset))


def evaluates(every: int | None, round_num: int, last_round: int) -> bool:
    """Whether a round evaluates: every `every` rounds and after the last; 0 = only after the last,
    None = never."""
    return every is not None and (round_num == last_round or bool(every and round_num % every == 0))


def evaluation_clients(config: config_lib.Config, client_ids: Sequence[str]) -> list[str]:
    """The first `eval_clients` clients (all when 0); with fixed selection these include the
    article's training clients."""
    ids = list(client_ids)
    return ids if config.eval_clients == 0 else ids[:config.eval_clients]


def preprocess_kwargs(config: config_lib.Config, epochs: int | None = None) -> dict:
    kwargs = dataclasses.asdict(config.preprocess)
    kwargs["seed"] = kwargs.pop("shuffle_seed")
    del kwargs["shuffle"]   # per round or fixed: the client inputs' `ShuffleSeeds`
    if epochs is not None:
        kwargs["epochs"] = epochs
    return kwargs


def write_config(run_dir: Path, config: config_lib.Config) -> None:
    resolved = config_lib.to_dict(config)
    resolved["versions"] = installed_versions()
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))


def check_population(config: config_lib.Config, dataset: FederatedDataset) -> None:
    available = len(dataset.train.client_ids)
    if config.clients_per_round > available:
        raise config_lib.ConfigError(f"clients_per_round: {config.clients_per_round} is more than the "
                                     f"{available} clients of the {dataset.name} data")


def starting_state(run: Run, process, resume: bool, echo: Callable[[str], None]) -> tuple[object, int]:
    """The seeded initial state, or with `resume` the newest intact checkpoint's state and round
    (what was logged after that round is dropped)."""
    config = run.config
    state = process.set_model_weights(
        process.initialize(), initial_weights(config.model, run.dataset.num_classes, config.seed))
    if not resume:
        return state, 0
    saved, done = run.checkpoints.load_latest(state, warn=echo)
    MetricsLog(run.run_dir).drop_after(done)
    drop_events_after(run.run_dir, done)
    echo(f"resuming after round {done}")
    return (state if saved is None else saved), done


def open_outputs(run: Run, fresh: bool) -> RunOutputs:
    config = run.config
    board = TensorBoardLog(run.run_dir)
    if fresh:
        board.write_text("config", (run.run_dir / CONFIG_FILE).read_text())
    names = weight_names(create_model(config.model, run.dataset.num_classes))
    return run_outputs(run.run_dir, board, run.checkpoints, names, config.histogram_every,
                       config.checkpoint_every, config.rounds)


# --- One round ------------------------------------------------------------------------------------

def play_round(run: Run, training: Training, evaluator: FederatedEvaluator, state,
               weights: tff.learning.models.ModelWeights, round_num: int, echo: Callable[[str], None],
               ) -> tuple[RoundRecord, object, tff.learning.models.ModelWeights]:
    """One round from the state after the previous one: plan, train, check, evaluate. Nothing is
    written, so a round that a lost worker interrupted can be played again."""
    config = run.config
    plan = run.participation.plan(round_num)
    record = RoundRecord(round_num, plan.public_ids(), plan.report())
    if plan.skipped:
        echo(format_skipped(round_num, len(plan.completed), len(plan.selected)))
    else:
        state, weights = train_round(training, state, plan, record, echo)
    if evaluates(config.eval_every, round_num, config.rounds):
        record.eval = {split: evaluator(weights, data) for split, data in run.eval_data.items()}
    if run.centralized is not None and evaluates(config.centralized_eval_every, round_num, config.rounds):
        record.eval = (record.eval or {}) | {"centralized": run.centralized(weights)}
    record.learning_rate = learning_rates(training.process, state)
    return record, state, weights


def train_round(training: Training, state, plan: RoundPlan, record: RoundRecord,
                echo: Callable[[str], None]) -> tuple[object, tff.learning.models.ModelWeights]:
    """Trains the plan's clients; fills in the record's train and aggregation parts."""
    training.begin_round(plan.round_num)
    result = training.process.next(state, training.client_inputs(plan.completed, plan.round_num))
    record.train = to_python(result.metrics["client_work"]["train"])
    weights = model_weights(training.process, result.state)
    if not (is_finite_loss(record.train) and all(np.isfinite(a).all() for a in weights.trainable)):
        raise TrainingDivergedError(
            f"training diverged at round {plan.round_num} (loss {record.train['loss']}); the last good state "
            f"is kept in {checkpoint_lib.DIRECTORY}/; lower the learning rates")
    record.aggregation = training.report.round(plan.round_num, result.metrics)
    echo(format_round(plan.round_num, record.train) + training.report.not_covered)
    if line := training.report.line(plan.round_num, record.aggregation):
        echo(line)
    return result.state, weights


class WorkerFailedError(RuntimeError):
    """A worker was lost and could not be replaced: retries used up, or a remote worker. `saved_round`
    is the last round whose state is checkpointed (0: none)."""

    saved_round = 0


def recovering(workers: runtime.Runtime, retries: int, round_num: int, echo: Callable[[str], None],
               play: Callable[[], tuple[RoundRecord, object, tff.learning.models.ModelWeights]],
               ) -> tuple[RoundRecord, object, tff.learning.models.ModelWeights]:
    """`play()`, played again on restarted workers when a local worker is lost, up to `retries`
    restarts in the whole run; the restarts are listed in the round's record."""
    events = []
    while True:
        try:
            record, state, weights = play()
            record.events = events
            return record, state, weights
        except runtime.WorkerLostError as lost:
            if not lost.restartable:
                raise WorkerFailedError(f"{lost} during round {round_num}") from lost
            if workers.restarts >= retries:
                raise WorkerFailedError(f"{lost} during round {round_num}, after {workers.restarts} "
                                        f"restart{'s' * (workers.restarts != 1)} (worker_retries)") from lost
            workers.restart()
            events.append({"event": "worker_restarted", "worker": lost.name, "cause": lost.cause})
            echo(f"{lost.name} {lost.cause} during round {round_num}; restarted, repeating round {round_num}")


def model_weights(process, state) -> tff.learning.models.ModelWeights:
    """The global model's weights in `state`, as `process.get_model_weights` gives them.

    TFF's FedAvg state already holds them, in Python, once `next` returns; reading them there saves a
    call to the worker every round. Other processes' states go through `get_model_weights`.
    """
    weights = getattr(state, "global_model_weights", None)
    if isinstance(weights, tff.learning.models.ModelWeights):
        return weights
    return process.get_model_weights(state)


def save_for_stop(checkpoints: Checkpoints, state, round_num: int) -> int:
    if round_num > 0 and round_num not in checkpoints.rounds():
        checkpoints.save(state, round_num)
    return round_num


# --- The end of the run ---------------------------------------------------------------------------

def personalize(run: Run, weights: tff.learning.models.ModelWeights, echo: Callable[[str], None]) -> dict | None:
    settings = run.config.personalization
    if not settings.enabled:
        return None
    clients = run.eval_ids[:settings.clients or None]
    result = PersonalizationEvaluator(run.model_fn, settings)(weights, run.dataset.train, run.dataset.test, clients)
    echo(format_personalization(result))
    return result


def finish(run: Run, training: Training, last: RoundRecord, last_train: dict | None,
           weights: tff.learning.models.ModelWeights, personalized: dict | None, resumed_after: int | None,
           seconds: float, echo: Callable[[str], None]) -> dict:
    """Saves the model, prints the final evaluation, writes `summary.json` and `curves.png`."""
    config, dataset = run.config, run.dataset
    to_keras(weights, config.model, dataset.num_classes).save(run.run_dir / MODEL_FILE)
    for split, metrics in last.eval.items():
        # The pooled test set is the server's, not the clients' data: no "not covered" note for it.
        echo(format_centralized(metrics) if split == "centralized"
             else format_eval(split, metrics) + training.report.not_covered)
    reached = targets.summarize(MetricsLog(run.run_dir).records(), config.accuracy_targets)
    if reached["evaluation"] is not None and reached["targets"]:
        echo(format_targets(reached))
    summary = {
        "dataset": dataset.name,
        "num_clients": len(dataset.train.client_ids),
        "clients_per_round": config.clients_per_round,
        "evaluation_clients": len(run.eval_ids),
        "rounds": config.rounds,
        "resumed_after_round": resumed_after,
        "model": config.model,
        "train": last_train,
        "eval": last.eval,
        "rounds_to_target": reached,
        "personalization": personalized,
        "aggregation": training.report.summary(),
        "total_seconds": seconds,
    }
    write_json(run.run_dir / SUMMARY_FILE, summary)
    importlib.import_module("fedmnist.outputs.plots").write_curves(run.run_dir)
    return summary


def _import_while_waiting(module: str) -> None:
    """Imports `module` in a thread while this one mostly waits on the worker (matplotlib is slow to
    import). A failed import is left to the main thread's own import of it, which reports it."""
    def load() -> None:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=load, name=f"import {module}", daemon=True).start()
