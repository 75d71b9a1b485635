"""Rounds to reach a target test accuracy, as McMahan et al. 2017 count them (their Table 2).

The paper's curves are made monotone by taking, at each round, the best test accuracy so far; the
rounds to a target are where that curve first reaches it, interpolated linearly between the two
evaluated rounds around the crossing (so 19.4 rounds is a meaningful answer). Test accuracy is the
server's centralized evaluation when the run logged it (`eval.centralized`), else federated evaluation
on the clients' test data (`eval.test`). Kept free of TensorFlow, like the records it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmnist.outputs.records import RoundRecord, accuracy_key

DEFAULT_TARGETS = (0.97, 0.99)
SOURCES = ("centralized", "test")


def accuracy_points(records: Sequence[RoundRecord]) -> tuple[str | None, list[tuple[int, float]]]:
    """(which evaluation, [(round, accuracy), ...]): centralized when any round logged it, else
    federated evaluation on test data; (None, []) when neither was logged."""
    for source in SOURCES:
        points = []
        for record in records:
            metrics = record.metrics(("eval", source))
            if metrics is not None and accuracy_key(metrics) in metrics:
                points.append((record.round, float(metrics[accuracy_key(metrics)])))
        if points:
            return source, points
    return None, []


def best_so_far(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    best, curve = float("-inf"), []
    for round_num, accuracy in points:
        best = max(best, accuracy)
        curve.append((round_num, best))
    return curve


def rounds_to_target(points: Sequence[tuple[int, float]], target: float) -> float | None:
    """The (fractional) round at which the best accuracy so far first reaches `target`; None if never."""
    previous = None
    for round_num, best in best_so_far(points):
        if best >= target:
            if previous is None:
                return float(round_num)  # reached at the first evaluation: nothing to interpolate from
            last_round, last_best = previous
            return last_round + (target - last_best) / (best - last_best) * (round_num - last_round)
        previous = (round_num, best)
    return None


def summarize(records: Sequence[RoundRecord], targets: Sequence[float] = DEFAULT_TARGETS) -> dict:
    """What summary.json and the report give: the evaluation used, the rounds evaluated, and per
    target (as a string key, e.g. "0.99") the rounds to reach it, or None when not reached."""
    source, points = accuracy_points(records)
    return {
        "evaluation": source,
        "rounds": records[-1].round if records else 0,
        "best_accuracy": max((accuracy for _, accuracy in points), default=None),
        "targets": {f"{target:g}": rounds_to_target(points, target) for target in targets},
    }


def describe(reached: float | None, rounds: int) -> str:
    """`19.4` or `not reached in 50 rounds` (`in 1 round`)."""
    return f"{reached:.1f}" if reached is not None else f"not reached in {count_rounds(rounds)}"


def count_rounds(rounds: int) -> str:
    """`1 round`, `10 rounds`."""
    return f"{rounds} round{'s' * (rounds != 1)}"
