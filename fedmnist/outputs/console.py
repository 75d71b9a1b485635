"""The lines a run prints: the article's `round  1, metrics={...}` and the evaluation results."""

from __future__ import annotations

from collections.abc import Mapping

from fedmnist.outputs.records import accuracy_key
from fedmnist.outputs.targets import describe as describe_rounds


def format_round(round_num: int, train_metrics: Mapping) -> str:
    """The article's line: `round  1, metrics={...}`."""
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in train_metrics.items()}
    return f"round {round_num:2d}, metrics={shown}"


def format_skipped(round_num: int, completed: int, selected: int) -> str:
    return (f"round {round_num:2d} skipped: {completed} of {selected} selected clients completed, "
            f"fewer than availability.min_clients")


def format_eval(split: str, metrics: Mapping) -> str:
    return f"eval on {split:5s} data: loss={metrics['loss']:.4f}, accuracy={metrics[accuracy_key(metrics)]:.4f}"


def format_final(summary: Mapping, not_covered: str, run_dir) -> str:
    """The run's last line: federated evaluation on the training and test clients, time, where the outputs are."""
    train, test = summary["eval"]["train"], summary["eval"]["test"]
    return (f"final: train accuracy {train[accuracy_key(train)]:.4f}, test accuracy {test[accuracy_key(test)]:.4f}"
            f"{not_covered}, {summary['total_seconds']:.1f} s; outputs in {run_dir}")


def format_personalization(summary: Mapping) -> str:
    return (f"personalized on {summary['clients']} clients: accuracy {summary['accuracy_before']:.4f} -> "
            f"{summary['accuracy_after']:.4f}, gain mean {summary['gain_mean']:+.4f}, quartiles "
            f"{summary['gain_q1']:+.4f} / {summary['gain_median']:+.4f} / {summary['gain_q3']:+.4f}")


def format_centralized(metrics: dict) -> str:
    return (f"centralized eval on the pooled test set ({metrics['num_examples']:,} examples): "
            f"loss={metrics['loss']:.4f}, accuracy={metrics['sparse_categorical_accuracy']:.4f}")


def format_targets(reached: dict) -> str:
    """`rounds to test accuracy (centralized): 0.97 in 12.3, 0.99 not reached in 50 rounds`."""
    parts = [f"{target} " + ("in " if rounds is not None else "") + describe_rounds(rounds, reached["rounds"])
             for target, rounds in reached["targets"].items()]
    return f"rounds to test accuracy ({reached['evaluation']}): " + ", ".join(parts)
