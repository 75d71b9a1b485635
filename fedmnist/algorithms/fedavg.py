"""`algorithm: fedavg`: McMahan et al.'s federated averaging, TFF's `build_weighted_fed_avg` as in the article
(`build_unweighted_fed_avg` when the aggregation mode weighs clients equally)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedmnist.algorithms.base import Algorithm

if TYPE_CHECKING:
    import tensorflow_federated as tff

    from fedmnist.algorithms.base import ModelFn


class FedAvg(Algorithm):
    name = "fedavg"

    def build(self, model_fn: ModelFn, client_optimizer: tff.learning.optimizers.Optimizer,
              server_optimizer: tff.learning.optimizers.Optimizer, *, weighted: bool = True,
              aggregator: Any = None) -> tff.learning.templates.LearningProcess:
        import tensorflow_federated as tff

        build = (tff.learning.algorithms.build_weighted_fed_avg if weighted
                 else tff.learning.algorithms.build_unweighted_fed_avg)
        return build(model_fn, client_optimizer_fn=client_optimizer, server_optimizer_fn=server_optimizer,
                     model_aggregator=aggregator)

    def client_work(self, model_fn: ModelFn, client_optimizer: tff.learning.optimizers.Optimizer,
                    weighted: bool = True) -> tff.learning.templates.ClientWorkProcess:
        import tensorflow_federated as tff

        weighting = tff.learning.ClientWeighting.NUM_EXAMPLES if weighted else tff.learning.ClientWeighting.UNIFORM
        return tff.learning.templates.build_model_delta_client_work(model_fn, client_optimizer,
                                                                    client_weighting=weighting)
