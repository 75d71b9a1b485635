"""What each workload runs, and the package's path: `fedmnist.loop.train` as a user runs it."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedmnist import runtime
from fedmnist.bench.figures import summarize
from fedmnist.bench.memory import TreeMemory
from fedmnist.config import Config
from fedmnist.outputs.records import RoundRecord

if TYPE_CHECKING:
    from fedmnist.data.sources import FederatedDataset

WORKLOADS = ("tutorial", "cnn", "scale", "paper-round", "startup")
# `paper-round` is opt-in: each round trains 3,000 CNN steps, and the workload runs the package, the floor
# and the floor's float32-noise run one after the other (its time: docs/performance.md, "paper-round").
# `startup` is opt-in too: it times whole default runs in fresh processes (fedmnist/bench/startup.py), a few
# minutes, and has no package paths or floor.
DEFAULT_WORKLOADS = ("tutorial", "cnn")


@dataclasses.dataclass(frozen=True)
class Workload:
    overrides: tuple[str, ...]
    paths: tuple[str, ...]          # package variants measured in this process
    note: str
    measure_float_noise: bool = True  # run the floor again from weights one ulp away (see floor.run_floor)


# Timed rounds train only: the floor evaluates nothing, so neither may the package's rounds (the config's
# default `eval_every` is 2, as in configs/tutorial.yaml).
NO_TIMED_EVALUATION = ("eval_every=0",)
WORKLOAD_SPECS = {
    "tutorial": Workload(
        ("data.dataset=digits", *NO_TIMED_EVALUATION),
        ("tff-datasets", "prepared", "prepared-2-workers"),
        "linear model, first 10 of 20 IID digits clients every round, 5 epochs, batch 20, 10 rounds"),
    "cnn": Workload(
        ("model=cnn", "data.dataset=synthetic", "data.num_clients=500", "clients_per_round=50",
         "client_selection=uniform", "rounds=5", "client_optimizer.learning_rate=0.05", *NO_TIMED_EVALUATION),
        ("prepared", "prepared-2-workers"),
        "CNN, 50 of 500 synthetic clients (40 train examples each) per round, 5 epochs, batch 20, 5 rounds"),
    "scale": Workload(
        ("data.dataset=synthetic", "data.num_clients=3383", "clients_per_round=100",
         "client_selection=uniform", "rounds=200",
         "eval_clients=100", *NO_TIMED_EVALUATION),
        ("prepared",),
        "linear model, 100 of 3,383 synthetic clients sized like federated EMNIST per round, 200 rounds",
        measure_float_noise=False),
    # McMahan et al. 2017's FedAvg CNN run, configs/mcmahan2017/cnn-fedavg-e5-b10-iid.yaml's training
    # settings, on synthetic MNIST-shaped clients (MNIST is not downloadable everywhere): 750 examples
    # each, 600 for training at the default test fraction 0.2. Not its evaluation settings: its
    # centralized evaluation every round would be timed in the package's rounds and not in the floor's.
    # Three rounds: the first traces, the last evaluates; round 2 is the package's steady round.
    "paper-round": Workload(
        ("seed=0", "model=cnn", "data.dataset=synthetic", "data.num_clients=100", "data.partition=iid",
         "data.examples_per_client=750", "data.test_fraction=0.2", "clients_per_round=10",
         "client_selection=uniform", "preprocess.epochs=5", "preprocess.batch_size=10",
         "preprocess.shuffle_buffer=600", "client_optimizer.name=sgd", "client_optimizer.learning_rate=0.2",
         "server_optimizer.name=sgd", "server_optimizer.learning_rate=1.0", "rounds=3",
         "histogram_every=0", "checkpoint_every=10", *NO_TIMED_EVALUATION),
        ("prepared",),
        "McMahan et al. 2017's FedAvg CNN round: 10 of 100 synthetic clients (600 train examples each), "
        "E=5, B=10, lr 0.2, 3 rounds"),
}
PATH_OVERRIDES = {
    "tff-datasets": ("client_input=datasets",),
    "prepared": ("client_input=prepared",),
    "prepared-2-workers": ("client_input=prepared", "num_workers=2"),
}


def run_package(config: Config, dataset: FederatedDataset | None = None) -> dict:
    """The package's experiment built from `config` (on `dataset` instead of the configured data when given)
    and run by `loop.run`, timed by each round's record as the `round_done` hook hands it over, with the
    process tree's RSS sampled throughout and as each round ends."""
    # Imported here: the command line answers --help before TensorFlow loads.
    from fedmnist import experiment, loop

    records: list[RoundRecord] = []
    rss_by_round: dict[int, int] = {}
    workers_rss_by_round: dict[int, int] = {}
    with TreeMemory() as memory, tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as run_dir:
        def round_done(record: RoundRecord) -> None:
            records.append(record)
            rss_by_round[record.round] = memory.current()
            workers_rss_by_round[record.round] = rss_by_round[record.round] - memory.root.memory_info().rss

        with experiment.build(config, Path(run_dir), echo=lambda line: None, dataset=dataset) as built:
            loop.run(built, loop.Hooks(round_done=round_done))
    leftover = runtime.worker_children()
    if leftover:
        raise RuntimeError(f"worker_binary processes left running: {leftover}")
    per_round = [{"loss": r.train["loss"], "accuracy": r.train["sparse_categorical_accuracy"]} for r in records]
    figures = summarize([r.seconds for r in records], records[-1].train["num_examples"], memory.peak,
                        per_round[-1]["accuracy"], per_round)
    figures["rss_gb_by_round"] = {k: v / 1e9 for k, v in sorted(rss_by_round.items())}
    figures["workers_rss_gb_by_round"] = {k: v / 1e9 for k, v in sorted(workers_rss_by_round.items())}
    return figures
