"""The pairwise-masking protocol (fedmnist/privacy/secagg.py) and Shamir sharing, on real float updates."""

import itertools

import numpy as np
import pytest
from scipy import stats

from fedmnist.privacy import secagg, shamir

pytestmark = pytest.mark.unit

BITS, CLIP, MAX_WEIGHT = 32, 2.0, 2048
LENGTH = 7850  # the article's model: 784 x 10 weights and 10 biases


def seeded_entropy(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def client_updates(num_clients: int, seed: int = 0, bits: int = BITS) -> tuple[dict, dict, float]:
    """Float updates of the article's size, encoded as the clients of a secure round encode them."""
    rng = np.random.default_rng(seed)
    scale = secagg.fixed_point_scale(bits, CLIP, MAX_WEIGHT, num_clients)
    floats = {u: (rng.normal(0.0, 0.01, LENGTH), float(rng.integers(50, 400))) for u in range(1, num_clients + 1)}
    encoded = {u: secagg.encode(x, w, CLIP, scale, MAX_WEIGHT, bits) for u, (x, w) in floats.items()}
    return floats, encoded, scale


def plain_sum(encoded: dict, members, bits: int = BITS) -> np.ndarray:
    total = np.zeros(len(next(iter(encoded.values()))), dtype=np.uint64)
    for u in members:
        total += encoded[u]
    return total & secagg.modulus_mask(bits)


@pytest.mark.parametrize("bits", [24, 32, 64])
def test_unmasked_sum_equals_plain_sum_of_quantized_updates(bits):
    floats, encoded, scale = client_updates(8, seed=bits, bits=bits)
    total, view = secagg.run_protocol(encoded, threshold=5, bits=bits, entropy=seeded_entropy(bits))
    np.testing.assert_array_equal(total, plain_sum(encoded, encoded, bits))
    # ... and it decodes to the example-weighted mean of the float updates, within half a step.
    mean, weight = secagg.decode_mean(total, scale, bits)
    weights = np.array([w for _, w in floats.values()])
    expected = sum(w * x for x, w in floats.values()) / weights.sum()
    assert weight == weights.sum()
    assert np.max(np.abs(mean - expected)) <= 0.5 / scale
    assert all(not np.array_equal(secagg.unpack(view.masked_inputs[u], view.length, bits), encoded[u])
               for u in encoded)


def test_what_the_server_receives_from_a_client_looks_uniform_and_uncorrelated():
    _, encoded, _ = client_updates(10, seed=1)
    _, view = secagg.run_protocol(encoded, threshold=6, bits=BITS, entropy=seeded_entropy(1))
    received = view.masked_inputs[3]
    update = encoded[3]
    masked = secagg.unpack(received, view.length, BITS)

    # Byte frequencies of the message: uniform (chi-square over 256 values).
    byte_counts = np.bincount(np.frombuffer(received, dtype=np.uint8), minlength=256)
    assert stats.chisquare(byte_counts).pvalue > 1e-3
    # Every bit position of the 32-bit values is a fair coin.
    ones = np.array([np.count_nonzero((masked >> np.uint64(b)) & np.uint64(1)) for b in range(BITS)])
    assert stats.chisquare(np.stack([ones, len(masked) - ones]), axis=0).pvalue.min() > 1e-4
    # The values are uniform on [0, 2^32) (Kolmogorov-Smirnov) and uncorrelated with the update.
    assert stats.kstest(masked / 2.0 ** BITS, "uniform").pvalue > 1e-3
    signed_update = secagg.to_signed(update, BITS).astype(float)
    assert abs(stats.pearsonr(masked.astype(float), signed_update)[0]) < 4 / np.sqrt(len(masked))

    # The same tests reject the unmasked update: they can tell structure from noise.
    plain_bytes = np.bincount(np.frombuffer(secagg.pack(update, BITS), dtype=np.uint8), minlength=256)
    assert stats.chisquare(plain_bytes).pvalue < 1e-12
    assert stats.kstest(update / 2.0 ** BITS, "uniform").pvalue < 1e-12


def test_server_view_holds_only_keys_ciphertexts_masked_inputs_and_shares():
    floats, encoded, _ = client_updates(5, seed=2)
    total, view = secagg.run_protocol(encoded, threshold=3, bits=BITS, entropy=seeded_entropy(2))
    # The view alone is enough to compute the sum again ...
    np.testing.assert_array_equal(secagg.server_aggregate(view), total)
    # ... and no share travels in the clear: relayed shares are ChaCha20-Poly1305 ciphertexts.
    sizes = {len(m) for messages in view.encrypted_shares.values() for m in messages.values()}
    assert sizes == {secagg.NONCE_BYTES + 8 + 2 * shamir.SHARE_BYTES + 16}
    # Survivors reveal self-mask shares only: no key share of anyone when nobody dropped.
    assert all(not response.key_shares for response in view.unmasking.values())


@pytest.mark.parametrize("dropped", [(4,), (1, 7), (2, 5, 9, 10)])
def test_dropouts_below_the_threshold_leave_the_sum_exact(dropped):
    _, encoded, _ = client_updates(10, seed=3)
    total, view = secagg.run_protocol(encoded, threshold=6, bits=BITS, dropped=dropped,
                                      entropy=seeded_entropy(len(dropped)))
    survivors = [u for u in encoded if u not in dropped]
    np.testing.assert_array_equal(total, plain_sum(encoded, survivors))
    # The server recovered each dropped client's masking key, and only theirs.
    for response in view.unmasking.values():
        assert sorted(response.key_shares) == sorted(dropped)
        assert sorted(response.self_mask_shares) == survivors
    # Dropped clients sent keys and shares but no masked input.
    assert set(view.masked_inputs) == set(survivors)


def test_too_many_dropouts_abort_the_round():
    _, encoded, _ = client_updates(10, seed=4)
    with pytest.raises(secagg.SecureAggregationError, match=r"5 of 10 clients .* threshold of 6"):
        secagg.run_protocol(encoded, threshold=6, bits=BITS, dropped=(1, 2, 3, 4, 5))


def test_an_honest_client_never_reveals_both_secrets_of_a_client():
    clients = {u: secagg.Client(u, threshold=2, bits=BITS) for u in (1, 2, 3)}
    roster = {u: c.advertise_keys() for u, c in clients.items()}
    shares = {u: c.share_keys(roster) for u, c in clients.items()}
    clients[1].receive_shares({u: m[1] for u, m in shares.items() if 1 in m})
    with pytest.raises(secagg.SecureAggregationError, match="both shares"):
        clients[1].unmasking_response(survivors=[1, 2], dropped=[2, 3])
    assert clients[1].unmasking_response(survivors=[1, 2], dropped=[3]).key_shares.keys() == {3}


def test_tampered_shares_are_rejected():
    clients = {u: secagg.Client(u, threshold=2, bits=BITS) for u in (1, 2)}
    roster = {u: c.advertise_keys() for u, c in clients.items()}
    message = bytearray(clients[1].share_keys(roster)[2])
    message[-1] ^= 1
    clients[2].share_keys(roster)
    with pytest.raises(secagg.SecureAggregationError, match="do not decrypt"):
        clients[2].receive_shares({1: bytes(message)})


def test_fixed_point_range_holds_the_extreme_sum():
    """Every client at the clipping bound with the largest weight: the sum must not wrap."""
    num_clients = 10
    scale = secagg.fixed_point_scale(BITS, CLIP, MAX_WEIGHT, num_clients)
    assert secagg.precision_bits(CLIP, scale) >= secagg.MIN_PRECISION_BITS
    for sign in (1.0, -1.0):
        update = np.zeros(LENGTH)
        update[0] = sign * CLIP
        encoded = {u: secagg.encode(update, MAX_WEIGHT, CLIP, scale, MAX_WEIGHT, BITS)
                   for u in range(1, num_clients + 1)}
        mean, weight = secagg.decode_mean(plain_sum(encoded, encoded), scale, BITS)
        assert weight == num_clients * MAX_WEIGHT  # (a weight above the bound is refused: test_secure_aggregation)
        assert mean[0] == pytest.approx(sign * CLIP, abs=0.5 / scale)


def test_encode_clips_the_l2_norm_and_zero_weights_non_finite_updates():
    scale = secagg.fixed_point_scale(BITS, 1.0, 100, 2)
    update = np.full(100, 0.5)  # norm 5
    mean, _ = secagg.decode_mean(secagg.encode(update, 10, 1.0, scale, 100, BITS), scale, BITS)
    assert np.linalg.norm(mean) == pytest.approx(1.0, abs=1e-3)
    update[3] = np.nan
    assert secagg.to_signed(secagg.encode(update, 10, 1.0, scale, 100, BITS), BITS).any() == 0


def test_shamir_any_threshold_subset_recovers_the_secret_and_fewer_cannot():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, range(1, 6))
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(shamir.NotEnoughSharesError):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    # Two shares fit every secret: for any candidate there is a degree-2 polynomial through them.
    for candidate in (bytes(32), b"\xff" * 32):
        points = {0: int.from_bytes(candidate, "big"), 1: shares[1], 2: shares[2]}
        third = _interpolate(points, 3)
        assert shamir.combine({1: shares[1], 2: shares[2], 3: third}, 3) == candidate


def _interpolate(points: dict[int, int], x: int) -> int:
    total = 0
    for i, y_i in points.items():
        term = y_i
        for j in points:
            if j != i:
                term = term * (x - j) * pow(i - j, -1, shamir.PRIME) % shamir.PRIME
        total = (total + term) % shamir.PRIME
    return total
