"""How a config section declares its settings: typed dataclass fields with ranges, checked by `fedmnist.config`.

TensorFlow-free, so every registered component (an aggregation mode, an algorithm) can declare its
section in its own module, and `fedmnist.config` can check a config before TensorFlow loads.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, *, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, below: float | None = None) -> Any:
    """A dataclass field whose value `fedmnist.config` checks against these bounds."""
    return dataclasses.field(default=default, metadata={"min": minimum, "above": above, "max": maximum,
                                                        "below": below})
