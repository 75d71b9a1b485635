"""`aggregation: compressed` (fedmnist.aggregation.quantization): TFF's quantizing aggregator with our bits and
threshold, and the bits its encoder really sends."""

import numpy as np
import pytest
import tensorflow_federated as tff

from fedmnist.aggregation.quantization import FLOAT_BITS, compression_aggregator, encoded_bits, quiet_bitpacking

pytestmark = pytest.mark.unit


def real_encoded_bits(shape: tuple[int, ...], bits: int) -> int:
    """What TFF's uniform quantization encoder (TFMOT's `tensor_encoding`, which TFF's
    `EncodedSumFactory.quantize_above_threshold` builds) really outputs for a tensor of `shape`."""
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.internal import tensor_encoding as te

    encoder = te.encoders.as_gather_encoder(te.encoders.uniform_quantization(bits), tf.TensorSpec(shape, tf.float32))
    encode_params, _, _ = encoder.get_params(encoder.initial_state())
    with quiet_bitpacking():
        encoded, _ = encoder.encode(tf.random.uniform(shape), encode_params)
    return sum(int(np.prod(t.shape)) * t.dtype.size * 8 for t in tf.nest.flatten(encoded))


# Small shapes at every bit width (words filled exactly, partly, or by one value), and the CNN's largest
# kernel, 1.6 million weights, once.
@pytest.mark.parametrize("shape, bits", [(shape, bits) for shape in [(784, 10), (5, 5, 1, 32), (33,), (7,)]
                                         for bits in (1, 3, 8, 16)] + [((3136, 512), 8)])
def test_encoded_bits_are_what_tffs_encoder_outputs(shape, bits):
    assert encoded_bits(shape, bits, 0) == real_encoded_bits(shape, bits)


def test_small_tensors_go_as_float32():
    assert encoded_bits((10,), 8, 1000) == FLOAT_BITS * 10
    assert encoded_bits((784, 10), 8, 1000) < encoded_bits((784, 10), 16, 1000) < FLOAT_BITS * 7840


def test_compression_aggregator_defaults_are_tffs():
    value_type = tff.types.to_type([(np.float32, (784, 10)), (np.float32, (10,))])
    ours = compression_aggregator().create(value_type, tff.TensorType(np.float32))
    theirs = tff.learning.compression_aggregator().create(value_type, tff.TensorType(np.float32))
    assert ours.next.type_signature == theirs.next.type_signature
    assert ours.initialize.type_signature == theirs.initialize.type_signature
