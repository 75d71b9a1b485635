"""What this machine has, for the checks that refuse a plan it cannot hold (no TensorFlow here)."""

from __future__ import annotations

import functools


@functools.cache
def memory_bytes() -> int:
    """This machine's memory, which no plan may exceed (read once)."""
    import psutil

    return psutil.virtual_memory().total


def gigabytes(num_bytes: float) -> str:
    """`num_bytes` in GB, as a person reads it: "0.123", "25.3", "48,000"."""
    gb = num_bytes / 1e9
    return f"{gb:.3g}" if gb < 999.5 else f"{gb:,.0f}"
