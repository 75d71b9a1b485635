"""The federated-averaging round loop: from a config to a trained model and its run directory.

One round, as in the article: select clients, preprocess their data (`make_federated_data`), run
`process.next`, and report the metrics; every `eval_every` rounds and at the end, evaluate the global
model on the evaluation clients' training and test data.
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
from fedmnist import checkpoint as checkpoint_lib
from fedmnist import dashboard, installed_versions, runtime
from fedmnist.aggregation import build_process
from fedmnist.checkpoint import Checkpoints
from fedmnist.data import FederatedDataset, load_dataset, make_federated_data
from fedmnist.evaluation import FederatedEvaluator
from fedmnist.logs import (MetricsLog, TensorBoardLog, drop_events_after, format_eval,
                           format_personalization, format_round, is_finite_loss, to_python, write_json)
from fedmnist.model import build_model_fn, create_model, initial_weights, to_keras
from fedmnist.participation import Participation
from fedmnist.personalization import PersonalizationEvaluator

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def evaluation_clients(config: config_lib.Config, client_ids: Sequence[str]) -> list[str]:
    """The first `eval_clients` clients (all when 0); with fixed selection these include the
    article's training clients."""
    ids = list(client_ids)
    return ids if config.eval_clients == 0 else ids[:config.eval_clients]


def preprocess_kwargs(config: config_lib.Config, epochs: int | None = None) -> dict:
    kwargs = dataclasses.asdict(config.preprocess)
    kwargs["seed"] = kwargs.pop("shuffle_seed")
    if epochs is not None:
        kwargs["epochs"] = epochs
    return kwargs


def write_config(run_dir: Path, config: config_lib.Config) -> None:
    resolved = config_lib.to_dict(config)
    resolved["versions"] = installed_versions()
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False))


def all_finite(arrays: Sequence) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def check_population(config: config_lib.Config, dataset: FederatedDataset) -> None:
    available = len(dataset.train.client_ids)
    if config.clients_per_round > available:
        raise config_lib.ConfigError(f"clients_per_round: {config.clients_per_round} is more than the "
                                     f"{available} clients of the {dataset.name} data")


class Interrupted(Exception):
    """A stop was requested (SIGINT/SIGTERM); the state after `round_num` is saved."""

    def __init__(self, round_num: int):
        super().__init__(f"interrupted after round {round_num}")
        self.round_num = round_num


def model_weights(process: tff.learning.templates.LearningProcess, state) -> tff.learning.models.ModelWeights:
    """The global model's weights in `state`, as `process.get_model_weights` gives them.

    TFF's FedAvg state already holds them, in Python, once `next` returns; reading them there saves a
    call to the worker every round. Other processes' states go through `get_model_weights`.
    """
    weights = getattr(state, "global_model_weights", None)
    if isinstance(weights, tff.learning.models.ModelWeights):
        return weights
    return process.get_model_weights(state)


def _never() -> bool:
    return False


def train(config: config_lib.Config, run_dir: Path, echo: Callable[[str], None] = tqdm.write,
          progress: bool = True, resume: bool = False, stop_requested: Callable[[], bool] = _never) -> dict:
    """Runs the job into `run_dir` (which must exist) and returns the summary it writes.

    With `resume`, training continues after the newest intact checkpoint in `run_dir`; rows of
    `metrics.jsonl` and TensorBoard events from rounds after it are dropped first, so every round
    appears exactly once. `stop_requested` is polled between rounds: when it returns True the
    current state is checkpointed and `Interrupted` is raised.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    tf.keras.utils.set_random_seed(config.seed)
    dataset = load_dataset(config.data, config.seed)
    check_population(config, dataset)
    write_config(run_dir, config)
    echo(f"data: {dataset.name}, {len(dataset.train.client_ids)} clients, "
         f"{config.clients_per_round} per round, model: {config.model}")

    model_fn = build_model_fn(config.model, dataset.num_classes)
    participation = Participation(config, dataset.train.client_ids)
    eval_ids = evaluation_clients(config, dataset.train.client_ids)
    train_kwargs = preprocess_kwargs(config)
    eval_data = {split: make_federated_data(client_data, eval_ids, **preprocess_kwargs(config, epochs=1))
                 for split, client_data in (("train", dataset.train), ("test", dataset.test))}
    metrics_log, checkpoints = MetricsLog(run_dir), Checkpoints(run_dir, keep=config.checkpoints_kept)
    histogram_names = dashboard.weight_names(create_model(config.model, dataset.num_classes))

    with runtime.local_runtime(log_path=run_dir / "worker.log", num_workers=config.num_workers,
                               addresses=config.workers):
        process, aggregation, client_inputs = build_process(config, model_fn, dataset.train, train_kwargs)
        if header := aggregation.header():
            echo(header)
        evaluator = FederatedEvaluator(model_fn)
        _import_while_waiting("fedmnist.plots")
        state = process.set_model_weights(
            process.initialize(), initial_weights(config.model, dataset.num_classes, config.seed))
        state, done = _restore(run_dir, checkpoints, metrics_log, state, echo) if resume else (state, 0)
        board = TensorBoardLog(run_dir)
        if done == 0:
            board.write_text("config", (run_dir / CONFIG_FILE).read_text())
        weights = model_weights(process, state)
        row: dict = {}
        last_train: dict | None = None
        rounds = tqdm(range(done + 1, config.rounds + 1), desc="rounds", unit="round",
                      initial=done, total=config.rounds, disable=not progress or None)
        for round_num in rounds:
            if stop_requested():
                raise Interrupted(_save_for_stop(checkpoints, state, round_num - 1))
            round_started = time.perf_counter()
            plan = participation.plan(round_num)
            row = {"round": round_num, "clients": plan.completed, "participation": plan.report()}
            if plan.skipped:
                echo(f"round {round_num:2d} skipped: {len(plan.completed)} of {len(plan.selected)} selected "
                     f"clients completed, fewer than availability.min_clients")
            else:
                if hasattr(process, "begin_round"):  # secure aggregation keys its simulated dropouts by round
                    process.begin_round(round_num)
                result = process.next(state, client_inputs(plan.completed))
                train_metrics = to_python(result.metrics["client_work"]["train"])
                weights = model_weights(process, result.state)
                if not (is_finite_loss(train_metrics) and all_finite(weights.trainable)):
                    raise TrainingDivergedError(
                        f"training diverged at round {round_num} (loss {train_metrics['loss']}); the last "
                        f"good state is kept in {checkpoint_lib.DIRECTORY}/; lower the learning rates")
                state, row["train"], last_train = result.state, train_metrics, train_metrics
                row["aggregation"] = aggregation.round(round_num, result.metrics)
                echo(format_round(round_num, train_metrics))
                if line := aggregation.line(round_num, row["aggregation"]):
                    echo(line)
            last = round_num == config.rounds
            if last or (config.eval_every and round_num % config.eval_every == 0):
                row["eval"] = {split: evaluator(weights, data) for split, data in eval_data.items()}
            row["seconds"] = time.perf_counter() - round_started
            metrics_log.append(row)
            histograms = config.histogram_every and (last or round_num % config.histogram_every == 0)
            _log_to_tensorboard(board, row, dashboard.learning_rates(process, state),
                                dashboard.weight_arrays(histogram_names, weights) if histograms else None)
            if last or round_num % config.checkpoint_every == 0:
                checkpoints.save(state, round_num)
            if last_train:
                rounds.set_postfix(loss=last_train["loss"], acc=last_train["sparse_categorical_accuracy"])
        personalized = None
        if row and config.personalization.enabled:
            p13n_ids = eval_ids[:config.personalization.clients or None]
            personalized = PersonalizationEvaluator(model_fn, config.personalization)(
                weights, dataset.train, dataset.test, p13n_ids)
            echo(format_personalization(personalized))
        board.close()

    if not row:
        raise config_lib.ConfigError(f"the run already has all {config.rounds} rounds; "
                                     f"pass --rounds with a larger number to continue it")
    to_keras(weights, config.model, dataset.num_classes).save(run_dir / MODEL_FILE)
    for split, metrics in row["eval"].items():
        echo(format_eval(split, metrics))
    summary = {
        "dataset": dataset.name,
        "num_clients": len(dataset.train.client_ids),
        "clients_per_round": config.clients_per_round,
        "evaluation_clients": len(eval_ids),
        "rounds": config.rounds,
        "resumed_after_round": done if resume else None,
        "model": config.model,
        "train": last_train,
        "eval": row["eval"],
        "personalization": personalized,
        "aggregation": aggregation.summary(),
        "total_seconds": time.perf_counter() - started,
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    importlib.import_module("fedmnist.plots").write_curves(run_dir)
    return summary


def _import_while_waiting(module: str) -> None:
    """Imports `module` in a thread while this one mostly waits on the worker (matplotlib: ~0.7 s).

    A failed import is left to the main thread's own import of it, which reports it.
    """
    def load() -> None:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001
            pass

    threading.Thread(target=load, name=f"import {module}", daemon=True).start()


def _log_to_tensorboard(board: TensorBoardLog, row: dict, learning_rates: dict,
                        weight_histograms: dict | None) -> None:
    """One round's scalars (train, eval, participation, aggregation, time, learning rates) and,
    when given, histograms of the global model's weights."""
    scalars = {k: row[k] for k in ("train", "eval", "participation", "aggregation") if k in row}
    board.write(row["round"], scalars | {"time": {"round_seconds": row["seconds"]},
                                         "learning_rate": learning_rates})
    if weight_histograms is not None:
        board.write_histograms(row["round"], weight_histograms)


def _restore(run_dir: Path, checkpoints: Checkpoints, metrics_log: MetricsLog, initial_state,
             echo: Callable[[str], None]) -> tuple[object, int]:
    """The newest intact checkpoint's state and round; what was logged after it is dropped."""
    saved, done = checkpoints.load_latest(initial_state, warn=echo)
    metrics_log.drop_after(done)
    drop_events_after(run_dir, done)
    echo(f"resuming after round {done}")
    return (initial_state if saved is None else saved), done


def _save_for_stop(checkpoints: Checkpoints, state, round_num: int) -> int:
    if round_num > 0 and round_num not in checkpoints.rounds():
        checkpoints.save(state, round_num)
    return round_num
