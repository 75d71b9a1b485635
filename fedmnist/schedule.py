"""The one rule for things done "every N rounds and after the last": evaluation, histograms, checkpoints."""

from __future__ import annotations


def due(every: int | None, round_num: int, last_round: int) -> bool:
    """Whether round `round_num` does it: every `every` rounds and after the last; `every` 0 = only after
    the last, None = never."""
    return every is not None and (round_num == last_round or bool(every and round_num % every == 0))
