"""The figures of one measured run, and how far two runs' per-round metrics are apart."""

from __future__ import annotations

import statistics


def summarize(round_seconds: list[float], examples_per_round: float, peak_rss: int,
              final_accuracy: float, per_round: list[dict], evaluated_last: bool = True) -> dict:
    """Median steady-state seconds per round and the rest of a path's figures.

    Steady state leaves out round 1 (tracing, worker start) and, when the run evaluated in its last
    round, that round too, so that every path is timed on training rounds alone.
    """
    steady = round_seconds[1:-1] if evaluated_last and len(round_seconds) > 2 else round_seconds[1:]
    steady = steady or round_seconds
    median = statistics.median(steady)
    return {"steady_s_per_round": median, "round1_s": round_seconds[0],
            "examples_per_s": examples_per_round / median if median else float("nan"),
            "peak_rss_gb": peak_rss / 1e9, "final_accuracy": final_accuracy,
            "rounds": len(round_seconds), "per_round": per_round}


def max_diff(a: list[dict], b: list[dict]) -> float:
    """The largest |difference| of loss or accuracy over the rounds of two runs."""
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("loss", "accuracy"))
