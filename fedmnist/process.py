"""Step 3 of the article: the federated averaging process, built from the config's optimizers.

`build_training_process` is the article's `build_weighted_fed_avg`. `ProcessBuilder` is what an aggregation
mode builds from: the configured algorithm on the configured client input (`client_input: prepared`,
fedmnist's prepared tensors, or `datasets`, the article's tf.data pipelines), with the mode's aggregator.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import tensorflow as tf
import tensorflow_federated as tff

from fedmnist.algorithms.base import Algorithm
from fedmnist.client_tensors import (ExaminedClients, PreparedClients, build_prepared_client_work,
                                     build_prepared_fed_avg)
from fedmnist.config import OptimizerConfig
from fedmnist.data.preprocessing import Preprocessing, count_examples, make_round_data
from fedmnist.model import update_shapes


def build_optimizer(cfg: OptimizerConfig) -> tff.learning.optimizers.Optimizer:
    """A `tff.learning.optimizers` optimizer; unset epsilons keep TFF's defaults."""
    extra = {} if cfg.epsilon is None else {"epsilon": cfg.epsilon}
    if cfg.name == "sgd":
        return tff.learning.optimizers.build_sgdm(learning_rate=cfg.learning_rate,
                                                  momentum=cfg.momentum or None)
    if cfg.name == "adam":
        return tff.learning.optimizers.build_adam(cfg.learning_rate, cfg.beta_1, cfg.beta_2, **extra)
    if cfg.name == "yogi":
        return tff.learning.optimizers.build_yogi(cfg.learning_rate, cfg.beta_1, cfg.beta_2, **extra)
    if cfg.name == "adagrad":
        return tff.learning.optimizers.build_adagrad(cfg.learning_rate, **extra)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def build_training_process(model_fn: Callable[[], tff.learning.models.VariableModel],
                           client_optimizer: OptimizerConfig,
                           server_optimizer: OptimizerConfig) -> tff.learning.templates.LearningProcess:
    """Federated averaging weighted by each client's number of examples, as in the article."""
    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=build_optimizer(client_optimizer),
        server_optimizer_fn=build_optimizer(server_optimizer))


@dataclasses.dataclass
class ProcessBuilder:
    """The algorithm on the client input, for an aggregation mode to build its process from.

    `prepared`: fedmnist's prepared client tensors (fedmnist/client_tensors.py) instead of the article's
    pipelines; `size_classes` pads them (worth it only when the clients change from round to round).
    """

    model_fn: Callable[[], tff.learning.models.VariableModel]
    algorithm: Algorithm
    client_optimizer: OptimizerConfig
    server_optimizer: OptimizerConfig
    client_data: tff.simulation.datasets.ClientData
    preprocessing: Preprocessing
    prepared: bool = True
    size_classes: bool = True
    num_classes: int | None = None  # with `origin`: clients' examples are checked (labels, pixels)
    origin: str = "the client data"
    # Prepared clients' examples written here for local workers to read (`PreparedClients`); None: sent.
    files_dir: Path | None = None

    def __post_init__(self):
        self.update_shapes = update_shapes(self.model_fn)

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for shape in self.update_shapes)

    @property
    def num_clients(self) -> int:
        return len(self.client_data.client_ids)

    def server_optimizer_fn(self) -> tff.learning.optimizers.Optimizer:
        return build_optimizer(self.server_optimizer)

    def learning_process(self, aggregator=None, weighted: bool = True) -> tff.learning.templates.LearningProcess:
        """The whole process, with `aggregator` (None: TFF's mean) weighted by examples or uniform."""
        client, server = build_optimizer(self.client_optimizer), build_optimizer(self.server_optimizer)
        if self.prepared:
            return build_prepared_fed_avg(self.model_fn, client, server, self.preprocessing.batch_size, aggregator,
                                          weighted, self.algorithm.proximal_strength, self.files_dir is not None)
        return self.algorithm.build(self.model_fn, client, server, weighted=weighted, aggregator=aggregator)

    def client_work(self, weighted: bool = True) -> tff.learning.templates.ClientWorkProcess:
        """The client work alone, for processes that aggregate the updates by other means."""
        client = build_optimizer(self.client_optimizer)
        if self.prepared:
            return build_prepared_client_work(self.model_fn, client, self.preprocessing.batch_size, weighted,
                                              self.algorithm.proximal_strength, self.files_dir is not None)
        return self.algorithm.client_work(self.model_fn, client, weighted)

    def client_inputs(self) -> Callable[[list[str], int], list]:
        """A round's client ids and number -> the process's client input."""
        if self.prepared:
            return PreparedClients(self.client_data, self.preprocessing, size_classes=self.size_classes,
                                   num_classes=self.num_classes, origin=self.origin, files_dir=self.files_dir)
        examine = (ExaminedClients(self.client_data, self.num_classes, self.origin) if self.num_classes is not None
                   else lambda client_ids: None)

        def round_data(client_ids: list[str], round_num: int) -> list[tf.data.Dataset]:
            examine(client_ids)
            return make_round_data(self.client_data, client_ids, round_num, self.preprocessing)

        return round_data

    def largest_client_weight(self) -> int:
        """The largest weight a client gets: its examples x epochs, which is what the example-weighted
        client work counts on the article's repeated dataset."""
        sizes = (count_examples(self.client_data.create_tf_dataset_for_client(c)) for c in self.client_data.client_ids)
        return self.preprocessing.epochs * max(sizes, default=0)
