"""The interface of a training algorithm: what the clients do with their data in a round, and how the
server applies the aggregated update."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Callable

    import tensorflow_federated as tff

    from fedmnist.config import Config

    ModelFn = Callable[[], tff.learning.models.VariableModel]


class Algorithm:
    """One training algorithm. Subclasses set `name`; with settings, `section` and `Settings` (a dataclass
    of `fedmnist.schema.setting` fields); `defaults` (dotted key -> value) for keys a config leaves unset."""

    name: ClassVar[str]
    section: ClassVar[str | None] = None
    Settings: ClassVar[type | None] = None
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Config):
        self.config = config

    @classmethod
    def check(cls, config: Config) -> None:
        """ConfigError for settings this algorithm cannot run with (no TensorFlow here)."""

    @property
    def proximal_strength(self) -> float:
        """mu of the proximal term (mu / 2) ||w - w_global||^2 added to each client's loss; 0 for none."""
        return 0.0

    def describe(self) -> str | None:
        """A line for the start of the run, when the algorithm is not the article's FedAvg."""
        return None

    def build(self, model_fn: ModelFn, client_optimizer: tff.learning.optimizers.Optimizer,
              server_optimizer: tff.learning.optimizers.Optimizer, *, weighted: bool = True,
              aggregator: Any = None) -> tff.learning.templates.LearningProcess:
        """The learning process on the article's tf.data client datasets, with `aggregator` as the
        model-update aggregator (None: TFF's mean)."""
        raise NotImplementedError

    def client_work(self, model_fn: ModelFn, client_optimizer: tff.learning.optimizers.Optimizer,
                    weighted: bool = True) -> tff.learning.templates.ClientWorkProcess:
        """The client work alone, on the article's datasets (for processes that aggregate by other means)."""
        raise NotImplementedError
