"""`aggregation: plain`: TFF's example-weighted mean, `build_weighted_fed_avg` as in the article."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmnist.aggregation.base import AggregationMode, Training

if TYPE_CHECKING:
    from fedmnist.process import ProcessBuilder


class Plain(AggregationMode):
    name = "plain"

    def build_training(self, builder: ProcessBuilder) -> Training:
        return Training(builder.learning_process(), builder.client_inputs())
