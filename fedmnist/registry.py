"""Every named component a config chooses: aggregation modes, training algorithms, data sources.

A component is a class in a module of its own, listed here as `name: "module:Class"`. Adding one is
that module plus one line below. The module is imported when a config first names it (or when
`fedmnist.config` collects the config sections components declare), so it must not import TensorFlow
at module level: the command line checks a config before TensorFlow loads.

This is the one place that compares a component's name: everything else asks the component.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from fedmnist.errors import ConfigError


class Registry:
    """Names -> component classes, for the config key `key`."""

    def __init__(self, key: str, entries: dict[str, str]):
        self.key, self.entries = key, dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self.entries)

    def get(self, name: str) -> Any:
        """The class registered as `name`; a ConfigError naming the choices when there is none."""
        if name not in self.entries:
            close = difflib.get_close_matches(str(name), self.names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{self.key}: {name!r} is not one of {', '.join(map(repr, self.names()))}{hint}")
        module, _, attribute = self.entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)

    def classes(self) -> list[Any]:
        return [self.get(name) for name in self.entries]


AGGREGATIONS = Registry("aggregation", {
    "plain": "fedmnist.aggregation.plain:Plain",
    "compressed": "fedmnist.aggregation.compressed:Compressed",
    "dp": "fedmnist.privacy.central_dp:CentralDp",
    "secure": "fedmnist.privacy.secure:Secure",
    "secure_dp": "fedmnist.privacy.secure_dp:SecureDp",
})

ALGORITHMS = Registry("algorithm", {
    "fedavg": "fedmnist.algorithms.fedavg:FedAvg",
    "fedsgd": "fedmnist.algorithms.fedsgd:FedSgd",
    "fedprox": "fedmnist.algorithms.fedprox:FedProx",
})

SOURCES = Registry("data.dataset", {
    "auto": "fedmnist.data.builtin:Auto",
    "emnist": "fedmnist.data.builtin:Emnist",
    "digits": "fedmnist.data.builtin:Digits",
    "synthetic": "fedmnist.data.builtin:Synthetic",
    "mnist": "fedmnist.data.builtin:Mnist",
})
