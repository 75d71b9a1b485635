"""The lines a run prints: the article's round line, `round  1, local training metrics={...}`, and the
evaluation results, in the vocabulary of fedmnist/outputs/records.py (local training; evaluation on
training data, on test data; centralized evaluation)."""

from __future__ import annotations

from collections.abc import Mapping

from fedmnist.outputs.records import LOCAL_TRAINING, accuracy_key, measurement
from fedmnist.outputs.targets import describe as describe_rounds

_EVAL_WIDTH = len(measurement("train").name) + 1  # the eval lines' numbers line up


def format_round(round_num: int, train_metrics: Mapping) -> str:
    """The article's line, `round  1, metrics={...}`, saying whose metrics they are: the clients' own, computed
    while they train in the round (TFF's `client_work/train`)."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in train_metrics.items()}
    return f"round {round_num:2d}, {LOCAL_TRAINING.name} metrics={shown}"


def format_skipped(round_num: int, completed: int, selected: int) -> str:
    return (f"round {round_num:2d} skipped: {completed} of {selected} selected clients completed, "
            f"fewer than availability.min_clients")


def format_eval(split: str, metrics: Mapping) -> str:
    """`evaluation on test data:     loss=0.9586, accuracy=0.8611` (split: "train" or "test")."""
    return (f"{measurement(split).name + ':':{_EVAL_WIDTH}s} loss={metrics['loss']:.4f}, "
            f"accuracy={metrics[accuracy_key(metrics)]:.4f}")


def format_final(summary: Mapping, not_covered: str, run_dir) -> str:
    """The run's last line: the final federated evaluation on training and test data, time, where the outputs are."""
    parts = []
    for split in ("train", "test"):
        measured = measurement(split)
        metrics = summary[measured.key]
        parts.append(f"{measured.name} accuracy {metrics[accuracy_key(metrics)]:.4f}")
    return f"final: {', '.join(parts)}{not_covered}, {summary['total_seconds']:.1f} s; outputs in {run_dir}"


def format_personalization(summary: Mapping) -> str:
    return (f"personalized on {summary['clients']} clients: accuracy {summary['accuracy_before']:.4f} -> "
            f"{summary['accuracy_after']:.4f}, gain mean {summary['gain_mean']:+.4f}, quartiles "
            f"{summary['gain_q1']:+.4f} / {summary['gain_median']:+.4f} / {summary['gain_q3']:+.4f}")


def format_centralized(metrics: Mapping, test_set: str = "the pooled test set") -> str:
    return (f"{measurement('centralized').name} on {test_set} ({metrics['num_examples']:,} examples): "
            f"loss={metrics['loss']:.4f}, accuracy={metrics[accuracy_key(metrics)]:.4f}")


def format_targets(reached: Mapping) -> str:
    """`rounds to test accuracy (centralized evaluation): 0.97 in 12.3, 0.99 not reached in 50 rounds`."""
    parts = [f"{target} " + ("in " if rounds is not None else "") + describe_rounds(rounds, reached["rounds"])
             for target, rounds in reached["targets"].items()]
    return f"rounds to test accuracy ({measurement(reached['evaluation']).name}): " + ", ".join(parts)
