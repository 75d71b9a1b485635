"""`aggregation: compressed` (fedmnist.privacy.compression): TFF's quantizing aggregator with our bits and
threshold, and the bits its encoder really sends."""

import numpy as np
import pytest
import tensorflow_federated as tff

from fedmnist.privacy.compression import FLOAT_BITS, compression_aggregator, encoded_bits

pytestmark = pytest.mark.unit


def test_encoded_bits_measure_tffs_encoder():
    assert encoded_bits((10,), 8, 1000) == FLOAT_BITS * 10  # small tensors go as float32
    for bits in (2, 8, 16):
        measured = encoded_bits((784, 10), bits, 1000)
        assert bits * 7840 + 64 <= measured < 32 * 7840
    assert encoded_bits((784, 10), 8, 1000) < encoded_bits((784, 10), 16, 1000)


def test_compression_aggregator_defaults_are_tffs():
    value_type = tff.types.to_type([(np.float32, (784, 10)), (np.float32, (10,))])
    ours = compression_aggregator().create(value_type, tff.TensorType(np.float32))
    theirs = tff.learning.compression_aggregator().create(value_type, tff.TensorType(np.float32))
    assert ours.next.type_signature == theirs.next.type_signature
    assert ours.initialize.type_signature == theirs.initialize.type_signature
