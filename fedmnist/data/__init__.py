"""Step 1 of the article: federated data (`sources`) and its preprocessing (`preprocessing`).

`python -m fedmnist.data describe` prints what a configured population looks like (`population`).
The names below are imported on first use, so that `describe` checks its arguments before
TensorFlow loads.
"""

import importlib

_PREPROCESSING = ("BATCH_SIZE", "NUM_CLIENTS", "NUM_EPOCHS", "PREFETCH_BUFFER", "SHUFFLE_BUFFER", "SHUFFLE_SEED",
                  "batch_format_fn", "input_spec", "make_federated_data", "preprocess",
                  "Preprocessing", "make_round_data", "round_shuffle_seed")
_SOURCES = ("CACHE_ENV", "EMNIST_FILE", "DataUnavailableError", "FederatedDataset", "client_data_from_arrays",
            "digits_as_emnist", "load_dataset", "load_digits", "load_emnist", "load_synthetic")
__all__ = [*_PREPROCESSING, *_SOURCES]


def __getattr__(name: str):
    if name in _PREPROCESSING:
        return getattr(importlib.import_module("fedmnist.data.preprocessing"), name)
    if name in _SOURCES:
        return getattr(importlib.import_module("fedmnist.data.sources"), name)
    raise AttributeError(f"module 'fedmnist.data' has no attribute {name!r}")
