"""Plain Python values from TensorFlow's and numpy's, for JSON and reports (no TensorFlow import here)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_python(value: Any) -> Any:
    """Nested mappings of numpy/TF numbers as plain dicts, floats and ints (JSON-ready)."""
    if isinstance(value, Mapping):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    if hasattr(value, "numpy"):
        value = value.numpy()
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    return value
