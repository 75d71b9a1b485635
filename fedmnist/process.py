"""Step 3 of the article: the federated averaging process, built from the config's optimizers."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow_federated as tff

from fedmnist.config import OptimizerConfig


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
