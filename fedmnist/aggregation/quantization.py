"""`aggregation: compressed`: TFF's uniform quantization of client updates, and the bits it really sends."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import numpy as np
import tensorflow_federated as tff

FLOAT_BITS = 32
PACKED_BITS_PER_WORD = 28


def compression_aggregator(bits: int = 8, threshold: int = 20000) -> tff.aggregators.WeightedAggregationFactory:
    """`tff.learning.compression_aggregator()` with its quantization bits and size threshold as
    parameters (TFF fixes 8 and 20,000, which leaves the article's 7,840-weight kernel unquantized):
    adaptive zeroing, adaptive L2 clipping, weighted mean, uniform quantization of large tensors."""
    quantized_sum = tff.aggregators.EncodedSumFactory.quantize_above_threshold(
        quantization_bits=bits, threshold=threshold)
    clipping_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2)
    zeroing_norm = tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=10.0, target_quantile=0.98, learning_rate=math.log(10.0), multiplier=2.0, increment=1.0)
    clipped = tff.aggregators.clipping_factory(clipping_norm, tff.aggregators.MeanFactory(quantized_sum))
    return tff.aggregators.zeroing_factory(zeroing_norm, clipped)


def encoded_bits(shape: tuple[int, ...], bits: int, threshold: int) -> int:
    """Bits of one tensor of `shape` as the compression aggregator's encoder sends it.

    Tensors of at most `threshold` elements go as float32. Larger ones go through TFF's uniform
    quantization encoder: each value becomes `bits` bits, bit-packed 28 per int32 word (its
    bitpacking keeps 4 bits of each word free), plus the range's min and max as two float32s.
    `tests/test_compression.py` checks this count against the encoder's real output.
    """
    size = int(np.prod(shape, dtype=np.int64))
    if size <= threshold:
        return FLOAT_BITS * size
    return FLOAT_BITS * (-(-size * bits // PACKED_BITS_PER_WORD)) + 2 * FLOAT_BITS


@contextlib.contextmanager
def quiet_bitpacking() -> Iterator[None]:
    """The bitpacking stage logs a memory warning on the root logger each time it is traced."""
    quiet = lambda record: "bitpacking" not in record.getMessage()  # noqa: E731
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)
