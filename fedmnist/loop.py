"""Step 5 of the article: the federated-averaging round loop.

`run(experiment, hooks)` plays an experiment's rounds (fedmnist/experiment.py builds it from a config). One
round, as in the article: plan (select the round's clients), train (`process.next` on their data), check
(a diverged loss stops the run), evaluate (federated evaluation every `eval_every` rounds and at the end),
record (one `RoundRecord`, released to the outputs). `train(config, run_dir)` builds and runs in one call.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow_federated as tff
from tqdm import tqdm

from fedmnist import experiment as experiment_lib
from fedmnist import runtime
from fedmnist.clients.participation import RoundPlan
from fedmnist.errors import Interrupted, TrainingDivergedError, WorkerFailedError
from fedmnist.experiment import Experiment
from fedmnist.outputs.console import format_round, format_skipped
from fedmnist.outputs.records import LOCAL_TRAINING, RoundRecord
from fedmnist.values import to_python


# Global weights beyond this have diverged although finite: their squares (norms, clipping, w.x) overflow
# float32, so every later round computes with infinities.
LARGEST_SAFE_WEIGHT = float(np.sqrt(np.finfo(np.float32).max))


@dataclasses.dataclass
class Hooks:
    """What the caller of `run` sees and decides: `stop_requested` is polled between rounds (when it
    returns True the state is checkpointed and `Interrupted` raised); `started(done, rounds)` and
    `round_done(record)` report progress (a progress bar, the benchmark's timings)."""

    stop_requested: Callable[[], bool] = lambda: False
    started: Callable[[int, int], None] = lambda done, rounds: None
    round_done: Callable[[RoundRecord], None] = lambda record: None


def run(experiment: Experiment, hooks: Hooks | None = None) -> dict:
    """Plays the rounds after the experiment's starting state, then finishes the run; returns the summary.

    A lost worker is restarted and its round played again (`worker_retries`); past that, or for a lost
    remote worker, the state is checkpointed and `WorkerFailedError` raised.
    """
    hooks = hooks or Hooks()
    state, done = experiment.start()
    hooks.started(done, experiment.rounds)
    weights, record, last_train = experiment.weights_of(state), None, None
    for round_num in range(done + 1, experiment.rounds + 1):
        if hooks.stop_requested():
            raise Interrupted(experiment.save_for_stop(state, round_num - 1))
        round_started = time.perf_counter()
        try:
            record, state, weights = recovering(experiment, round_num,
                                                lambda: play_round(experiment, state, weights, round_num))
        except (WorkerFailedError, TrainingDivergedError) as error:
            error.saved_round = experiment.save_for_stop(state, round_num - 1)
            raise
        if experiment.mode.round_time_public:
            record.seconds = time.perf_counter() - round_started
        last_train = record.train or last_train
        experiment.outputs.release(record, state, weights)
        hooks.round_done(record)
        if round_num < experiment.rounds and experiment.target_stop_due(round_num):
            experiment.save_for_stop(state, round_num)  # so `--resume --rounds` could still extend it
            experiment.echo(f"the highest accuracy target was reached; stopping after round {round_num} "
                            f"(stop_after_target: {experiment.stop_after_target})")
            break
    if record is None:  # resumed after the last round: only the end of the run is left, if that
        record, last_train = experiment.unfinished_end()
    return experiment.finish(record, last_train, weights, done)


def train(config, run_dir: Path, echo: Callable[[str], None] = tqdm.write, progress: bool = True,
          resume: bool = False, stop_requested: Callable[[], bool] = lambda: False,
          dataset=None) -> dict:
    """Builds the experiment `config` describes into `run_dir` (which must exist) and runs it; the summary.
    `dataset` replaces the configured data source (the benchmark's generated populations)."""
    bar = ProgressBar(enabled=progress)
    with experiment_lib.build(config, run_dir, echo, resume, dataset) as experiment:
        try:
            return run(experiment, Hooks(stop_requested, bar.start, bar.update))
        finally:
            bar.close()


class ProgressBar:
    """tqdm's bar over the rounds, with the last round's loss and accuracy."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, done: int, rounds: int) -> None:
        self.bar = tqdm(desc="rounds", unit="round", initial=done, total=rounds, disable=not self.enabled or None)

    def update(self, record: RoundRecord) -> None:
        if record.train:
            shown = {"loss": record.train["loss"], "accuracy": record.train.get("sparse_categorical_accuracy")}
            self.bar.set_postfix_str(f"{LOCAL_TRAINING.name} " + ", ".join(
                f"{name} {value:.4f}" for name, value in shown.items() if value is not None))
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- One round ------------------------------------------------------------------------------------

def play_round(experiment: Experiment, state, weights: tff.learning.models.ModelWeights, round_num: int,
               ) -> tuple[RoundRecord, object, tff.learning.models.ModelWeights]:
    """One round from the state after the previous one: plan, train, check, evaluate. Nothing is
    written, so a round that a lost worker interrupted can be played again."""
    plan = experiment.participation.plan(round_num)
    record = RoundRecord(round_num, plan.public_ids(), plan.report())
    if plan.skipped:
        experiment.echo(format_skipped(round_num, len(plan.completed), len(plan.selected)))
    else:
        state, weights = train_round(experiment, state, plan, record)
    record.eval = experiment.evaluations(round_num, weights)
    for split, metrics in (record.eval or {}).items():
        if not np.isfinite(float(metrics.get("loss", 0.0))):
            raise TrainingDivergedError(f"the global model diverged at round {round_num}: its evaluation loss on "
                                        f"{split} data is {metrics['loss']}; lower the learning rates")
    record.learning_rate = dict(experiment.learning_rates)
    return record, state, weights


def train_round(experiment: Experiment, state, plan: RoundPlan, record: RoundRecord,
                ) -> tuple[object, tff.learning.models.ModelWeights]:
    """Trains the plan's clients; fills in the record's train and aggregation parts."""
    training, mode = experiment.training, experiment.mode
    training.begin_round(plan.round_num)
    client_inputs = training.client_inputs(plan.completed, plan.round_num)
    if plan.round_num < experiment.rounds:  # the next round's clients are prepared while this one trains
        training.prefetch(experiment.participation.upcoming(plan.round_num + 1), plan.round_num + 1)
    result = training.process.next(state, client_inputs)
    record.train = to_python(result.metrics["client_work"]["train"])
    weights = experiment.weights_of(result.state)
    if plan.completed and record.train.get("num_examples", 1) == 0:
        # TFF's client work sends a non-finite update as zeros with weight 0 and no metrics.
        raise TrainingDivergedError(f"training diverged at round {plan.round_num}: no client's update was finite "
                                    f"(all {len(plan.completed)} were NaN or infinite); lower the learning rates")
    largest = max((float(np.max(np.abs(a))) for a in weights.trainable if np.size(a)), default=0.0)
    if not np.isfinite(float(record.train.get("loss", 0.0))) or not largest <= LARGEST_SAFE_WEIGHT:
        raise TrainingDivergedError(f"training diverged at round {plan.round_num} (training loss "
                                    f"{record.train.get('loss')}, largest global weight {largest:.3g}); "
                                    f"lower the learning rates")
    record.aggregation = mode.round(plan.round_num, result.metrics)
    record.train = mode.released_train(record.train)
    experiment.echo(format_round(plan.round_num, record.train) + mode.not_covered)
    if line := mode.line(plan.round_num, record.aggregation):
        experiment.echo(line)
    return result.state, weights


def recovering(experiment: Experiment, round_num: int,
               play: Callable[[], tuple[RoundRecord, object, tff.learning.models.ModelWeights]],
               ) -> tuple[RoundRecord, object, tff.learning.models.ModelWeights]:
    """`play()`, played again on restarted workers when a local worker is lost, up to `worker_retries`
    restarts in the whole run; the restarts are listed in the round's record."""
    workers, retries, events = experiment.workers, experiment.worker_retries, []
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
            experiment.echo(f"{lost.name} {lost.cause} during round {round_num}; restarted, repeating round {round_num}")
