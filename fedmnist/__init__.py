"""fedmnist: the TensorFlow Federated image-classification tutorial as installable, tested software."""

import os
from importlib import metadata

# TensorFlow 2.14 logs spurious C++ errors at import (duplicate cuDNN/cuFFT/cuBLAS factories on a
# CPU-only machine) that bury the run's own output; real failures still raise Python exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# gRPC logs an INFO line ("skipping fork() handlers") each time a second TFF worker is started.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

__version__ = metadata.version("fedmnist")


def installed_versions() -> dict[str, str]:
    """The versions that decide a run's numbers, recorded in each run's config.yaml."""
    names = ("fedmnist", "tensorflow", "tensorflow-federated", "numpy")
    return {name: metadata.version(name) for name in names}
