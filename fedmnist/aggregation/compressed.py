"""`aggregation: compressed`: uniform quantization of the update, as `tff.learning.compression_aggregator`.

Each client uploads what TFF's encoder produces, counted from its format (quantization.py,
checked against the real encoder in the tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dataclasses
import math
from collections.abc import Mapping

from fedmnist.aggregation.base import AggregationMode, Training
from fedmnist.schema import setting

if TYPE_CHECKING:
    from fedmnist.process import ProcessBuilder


@dataclasses.dataclass
class CompressionConfig:
    """`compression:` settings."""
    bits: int = setting(8, minimum=1, maximum=16)
    threshold: int = setting(20000, minimum=0)              # only tensors larger than this are quantized


class Compressed(AggregationMode):
    name = "compressed"
    section, Settings = "compression", CompressionConfig

    def build_training(self, builder: ProcessBuilder) -> Training:
        from fedmnist.aggregation.quantization import (FLOAT_BITS, compression_aggregator, encoded_bits,
                                                       quiet_bitpacking)

        settings = self.config.compression
        self.quantized = sum(math.prod(s) > settings.threshold for s in builder.update_shapes)
        self.upload_bits = sum(encoded_bits(s, settings.bits, settings.threshold) for s in builder.update_shapes)
        self.upload_bits += FLOAT_BITS  # the example weight
        with quiet_bitpacking():
            process = builder.learning_process(compression_aggregator(settings.bits, settings.threshold))
        return Training(process, builder.client_inputs())

    def header(self) -> str:
        settings = self.config.compression
        line = (f"compression: {self.quantized} of the update's tensors quantized to {settings.bits} bits, "
                f"{self.upload_bits / 8:,.0f} bytes per client per round instead of {self.float_bytes:,}")
        if not self.quantized:
            line += f" (no tensor has more than compression.threshold={settings.threshold} elements)"
        return line

    def figures(self, round_num: int, metrics: Mapping) -> dict:
        return {"upload_bits_per_client": self.upload_bits, "uncompressed_bits_per_client": 8 * self.float_bytes,
                "upload_bytes_per_client": self.upload_bits / 8}

    def summary(self) -> dict:
        return super().summary() | {"upload_bits_per_client": self.upload_bits,
                                    "uncompressed_bits_per_client": 8 * self.float_bytes}
