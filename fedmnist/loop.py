"""The federated-averaging round loop: from a config to a trained model and its run directory.

One round, as in the article: select clients, preprocess their data (`make_federated_data`), run
`process.next`, and report the metrics; every `eval_every` rounds and at the end, evaluate the global
model on the evaluation clients' training and test data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import tensorflow as tf
import tensorflow_federated as tff
import yaml
from tqdm import tqdm

from fedmnist import config as config_lib
from fedmnist import installed_versions, runtime
from fedmnist.data import FederatedDataset, load_dataset, make_federated_data
from fedmnist.evaluation import FederatedEvaluator
from fedmnist.logs import (MetricsLog, TensorBoardLog, format_eval, format_round, is_finite_loss,
                           to_python, write_json)
from fedmnist.model import build_model_fn, initial_weights, to_keras
from fedmnist.prepared import build_training

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


def client_selector(config: config_lib.Config, client_ids: Sequence[str]) -> Callable[[int], list[str]]:
    """Which clients train in a round: the first K every round (the article), or a seeded uniform
    sample per round (`tff.simulation.build_uniform_sampling_fn`), the same for the same round."""
    ids = list(client_ids)
    count = config.clients_per_round
    if config.client_selection == "fixed":
        return lambda round_num: ids[:count]
    sample = tff.simulation.build_uniform_sampling_fn(ids, replace=False, random_seed=config.seed)
    return lambda round_num: [str(c) for c in sample(round_num, count)]


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


def check_population(config: config_lib.Config, dataset: FederatedDataset) -> None:
    available = len(dataset.train.client_ids)
    if config.clients_per_round > available:
        raise config_lib.ConfigError(f"clients_per_round: {config.clients_per_round} is more than the "
                                     f"{available} clients of the {dataset.name} data")


def train(config: config_lib.Config, run_dir: Path, echo: Callable[[str], None] = tqdm.write,
          progress: bool = True) -> dict:
    """Runs the whole job into `run_dir` (which must exist) and returns the summary it writes."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    tf.keras.utils.set_random_seed(config.seed)
    dataset = load_dataset(config.data, config.seed)
    check_population(config, dataset)
    write_config(run_dir, config)
    echo(f"data: {dataset.name}, {len(dataset.train.client_ids)} clients, "
         f"{config.clients_per_round} per round, model: {config.model}")

    model_fn = build_model_fn(config.model, dataset.num_classes)
    select = client_selector(config, dataset.train.client_ids)
    eval_ids = evaluation_clients(config, dataset.train.client_ids)
    train_kwargs = preprocess_kwargs(config)
    eval_data = {split: make_federated_data(client_data, eval_ids, **preprocess_kwargs(config, epochs=1))
                 for split, client_data in (("train", dataset.train), ("test", dataset.test))}
    metrics_log, board = MetricsLog(run_dir), TensorBoardLog(run_dir)

    with runtime.local_runtime(log_path=run_dir / "worker.log", num_workers=config.num_workers,
                               addresses=config.workers):
        process, client_inputs = build_training(config, model_fn, dataset.train, train_kwargs)
        evaluator = FederatedEvaluator(model_fn)
        state = process.set_model_weights(
            process.initialize(), initial_weights(config.model, dataset.num_classes, config.seed))
        row: dict = {}
        rounds = tqdm(range(1, config.rounds + 1), desc="rounds", unit="round", disable=not progress or None)
        for round_num in rounds:
            round_started = time.perf_counter()
            client_ids = select(round_num)
            result = process.next(state, client_inputs(client_ids))
            train_metrics = to_python(result.metrics["client_work"]["train"])
            if not is_finite_loss(train_metrics):
                raise TrainingDivergedError(
                    f"training diverged at round {round_num} (loss {train_metrics['loss']}); "
                    f"lower the learning rates")
            state = result.state
            row = {"round": round_num, "clients": client_ids, "train": train_metrics}
            echo(format_round(round_num, train_metrics))
            last = round_num == config.rounds
            if last or (config.eval_every and round_num % config.eval_every == 0):
                weights = process.get_model_weights(state)
                row["eval"] = {split: evaluator(weights, data) for split, data in eval_data.items()}
            row["seconds"] = time.perf_counter() - round_started
            metrics_log.append(row)
            board.write(round_num, {k: row[k] for k in ("train", "eval") if k in row}
                        | {"time": {"round_seconds": row["seconds"]}})
            rounds.set_postfix(loss=train_metrics["loss"], acc=train_metrics["sparse_categorical_accuracy"])
        final_weights = process.get_model_weights(state)
    board.close()

    to_keras(final_weights, config.model, dataset.num_classes).save(run_dir / MODEL_FILE)
    for split, metrics in row["eval"].items():
        echo(format_eval(split, metrics))
    summary = {
        "dataset": dataset.name,
        "num_clients": len(dataset.train.client_ids),
        "clients_per_round": config.clients_per_round,
        "evaluation_clients": len(eval_ids),
        "rounds": config.rounds,
        "model": config.model,
        "train": row["train"],
        "eval": row["eval"],
        "total_seconds": time.perf_counter() - started,
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary
