"""The privacy review of `aggregation: secure` (fedmnist/privacy/secagg.py, shamir.py, secure_process.py):
thresholds of at least 2, one unmasking answer per client, clients that drop after sending their input,
nothing from a dropped client in the round's metrics, weights never capped, validated fixed-point
parameters. Real protocol runs and real TFF rounds, no mocks."""

from __future__ import annotations

import numpy as np
import pytest

from fedmnist import config as config_lib
from fedmnist.privacy.secure import SecureConfig
from fedmnist.privacy import secagg, shamir

BITS, CLIP = 32, 2.0


def seeded_entropy(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def integer_inputs(num_clients: int, length: int = 50, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2**BITS, size=length, dtype=np.uint64) for u in range(1, num_clients + 1)}


def plain_sum(inputs: dict[int, np.ndarray], members) -> np.ndarray:
    return sum((inputs[u] for u in members), np.zeros_like(next(iter(inputs.values())))) & secagg.modulus_mask(BITS)


def clients_after_key_sharing(count: int, threshold: int) -> dict[int, secagg.Client]:
    """Clients that have advertised keys and received each other's encrypted shares (rounds 0 and 1)."""
    clients = {u: secagg.Client(u, threshold, BITS, seeded_entropy(u)) for u in range(1, count + 1)}
    roster = {u: c.advertise_keys() for u, c in clients.items()}
    shares = {u: c.share_keys(roster) for u, c in clients.items()}
    for v, client in clients.items():
        client.receive_shares({u: m[v] for u, m in shares.items() if v in m})
    return clients


# --- 1. Threshold ------------------------------------------------------------------------------

@pytest.mark.unit
def test_a_threshold_below_two_is_refused_by_shamir_and_the_protocol():
    secret = bytes(range(32))
    with pytest.raises(ValueError, match="at least 2"):
        shamir.split(secret, 1, [1, 2, 3])
    shares = shamir.split(secret, 2, [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2"):
        shamir.combine({1: shares[1]}, 1)
    with pytest.raises(ValueError, match="at least 2"):
        secagg.Client(1, threshold=1, bits=BITS)
    with pytest.raises(ValueError, match="at least 2"):
        secagg.run_protocol(integer_inputs(3), threshold=1, bits=BITS)
    # t = 2 is the least that works.
    total, _ = secagg.run_protocol(integer_inputs(2), threshold=2, bits=BITS)
    np.testing.assert_array_equal(total, plain_sum(integer_inputs(2), [1, 2]))


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["secure.threshold=1"], "secure.threshold: 1 is too low"),
    (["clients_per_round=1", "data.num_clients=2"], "clients_per_round: aggregation: secure needs at least 2"),
])
def test_the_config_refuses_a_threshold_of_one_and_a_single_client_per_round(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message) as refused:
        config_lib.load(None, ["aggregation=secure", *overrides])
    assert "\n" not in str(refused.value)
    config_lib.load(None, overrides)  # plain aggregation does not use the threshold


@pytest.mark.unit
@pytest.mark.parametrize("overrides, message", [
    (["--set", "secure.threshold=1"], "secure.threshold: 1 is too low"),
    (["--set", "clients_per_round=1"], "clients_per_round: aggregation: secure needs at least 2"),
])
def test_the_cli_refuses_them_in_one_line_with_exit_code_2(tmp_path, monkeypatch, overrides, message):
    from helpers import train_main

    monkeypatch.chdir(tmp_path)
    result = train_main("--dataset", "digits", "--set", "aggregation=secure", *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def split_attack(clients: int, threshold: int, target: int = 3) -> np.ndarray:
    """A curious server's attack on a threshold of at most half the clients: it tells one group of `threshold`
    clients that everyone survived (they send shares of the target's self-mask seed b) and a disjoint group
    that the target dropped (they send shares of its masking key s). Each honest client answers once, yet
    the server holds both secrets, and so the target's input. Returns what the server recovers."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    rng = np.random.default_rng(0)
    parties = {u: secagg.Client(u, threshold, BITS) for u in range(1, clients + 1)}
    roster = {u: c.advertise_keys() for u, c in parties.items()}
    shares = {u: c.share_keys(roster) for u, c in parties.items()}
    for v, c in parties.items():
        c.receive_shares({u: shares[u][v] for u in parties if u != v})
    inputs = {u: rng.integers(0, 2**BITS, 16, dtype=np.uint64) for u in parties}
    masked = {u: c.masked_input(inputs[u]) for u, c in parties.items()}
    everyone = set(parties)
    group_a = [target] + sorted(everyone - {target})[:threshold - 1]  # the target answers too, as a survivor
    group_b = sorted(everyone - set(group_a))[:threshold]
    told_alive = {v: parties[v].unmasking_response(everyone, set()) for v in group_a}
    told_dropped = {v: parties[v].unmasking_response(everyone - {target}, {target}) for v in group_b}
    seed = shamir.combine({v: shamir.share_from_bytes(r.self_mask_shares[target]) for v, r in told_alive.items()},
                          threshold)
    key = X25519PrivateKey.from_private_bytes(shamir.combine(
        {v: shamir.share_from_bytes(r.key_shares[target]) for v, r in told_dropped.items()}, threshold))
    recovered = secagg.unpack(masked[target], 16, BITS) - secagg.prg(seed, 16, BITS)
    for v in everyone - {target}:
        shared = key.exchange(X25519PublicKey.from_public_bytes(roster[v].masking))
        pairwise = secagg.prg(secagg.derive_key(shared, b"mask"), 16, BITS)
        recovered = recovered - pairwise if secagg.mask_sign(target, v) > 0 else recovered + pairwise
    np.testing.assert_array_equal(recovered & secagg.modulus_mask(BITS), inputs[target])
    return recovered


@pytest.mark.unit
@pytest.mark.parametrize("clients, threshold", [(10, 5), (4, 2)])
def test_the_split_attack_recovers_one_clients_input_when_the_threshold_is_at_most_half(clients, threshold):
    split_attack(clients, threshold)  # the protocol alone cannot stop it: the config must refuse such thresholds


@pytest.mark.unit
def test_the_split_attack_fails_above_half():
    with pytest.raises(ValueError):  # two disjoint groups of 6 do not exist among 10: too few shares of one secret
        split_attack(10, 6)


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["secure", "secure_dp"])
@pytest.mark.parametrize("threshold, clients", [(5, 10), (2, 4), (3, 6)])
def test_a_threshold_at_or_below_half_of_the_clients_is_refused(mode, threshold, clients):
    with pytest.raises(config_lib.ConfigError) as refused:
        config_lib.load(None, [f"aggregation={mode}", f"secure.threshold={threshold}", f"clients_per_round={clients}"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"secure.threshold: {threshold} is at most half of the "
                                                       f"{clients} clients per round")
    config_lib.load(None, [f"aggregation={mode}", f"secure.threshold={clients // 2 + 1}",
                           f"clients_per_round={clients}"])  # a majority is accepted


# --- 3. One unmasking answer per client ----------------------------------------------------------

@pytest.mark.unit
def test_a_client_answers_the_unmasking_request_only_once():
    clients = clients_after_key_sharing(4, threshold=2)
    first = clients[1].unmasking_response(survivors=[1, 2, 3], dropped=[4])
    assert set(first.self_mask_shares) == {1, 2, 3} and set(first.key_shares) == {4}
    # The swapped request would hand the server a share of client 3's key as well as of its self-mask.
    with pytest.raises(secagg.SecureAggregationError, match="already answered"):
        clients[1].unmasking_response(survivors=[1, 2, 4], dropped=[3])
    with pytest.raises(secagg.SecureAggregationError, match="already answered"):
        clients[1].unmasking_response(survivors=[1, 2, 3], dropped=[4])


# --- 4. Dropping after sending the masked input ----------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("dropped, late", [((), (4,)), ((2,), (4, 5, 7)), ((1, 10), (3, 6))])
def test_clients_that_drop_after_sending_their_input_stay_in_the_exact_sum(dropped, late):
    inputs = integer_inputs(10, seed=len(late))
    total, view = secagg.run_protocol(inputs, threshold=6, bits=BITS, dropped=dropped,
                                      entropy=seeded_entropy(7), dropped_after_input=late)
    senders = [u for u in inputs if u not in dropped]
    np.testing.assert_array_equal(total, plain_sum(inputs, senders))
    assert sorted(view.masked_inputs) == senders
    assert sorted(view.unmasking) == [u for u in senders if u not in late]


@pytest.mark.unit
def test_too_few_clients_left_to_unmask_abort_the_round():
    inputs = integer_inputs(10, seed=3)
    with pytest.raises(secagg.SecureAggregationError, match="5 of 10 clients stayed to unmask") as aborted:
        secagg.run_protocol(inputs, threshold=6, bits=BITS, dropped=(2,), dropped_after_input=(4, 5, 7, 9))
    assert len(aborted.value.view.masked_inputs) == 9 and len(aborted.value.view.unmasking) == 5
    with pytest.raises(ValueError, match="both before and after"):
        secagg.run_protocol(inputs, threshold=6, bits=BITS, dropped=(2,), dropped_after_input=(2,))


# --- 5 and 6. Weights and fixed-point parameters -----------------------------------------------------

@pytest.mark.unit
def test_a_weight_above_the_bound_is_refused_not_capped():
    scale = secagg.fixed_point_scale(BITS, CLIP, 2048, 10)
    update = np.full(20, 0.01)
    with pytest.raises(ValueError, match="client weight of 3000 is outside 0..2048"):
        secagg.encode(update, 3000, CLIP, scale, 2048, BITS)
    mean, weight = secagg.decode_mean(secagg.encode(update, 2048, CLIP, scale, 2048, BITS), scale, BITS)
    assert weight == 2048 and np.max(np.abs(mean - 0.01)) <= 0.5 / scale


@pytest.mark.unit
def test_the_config_bound_on_client_weights_is_derived_or_enforced():
    from fedmnist.privacy.secure import secure_weight_bound

    derived = SecureConfig()
    assert secure_weight_bound(derived, 10, 3000) == 3000
    with pytest.raises(config_lib.ConfigError, match=r"secure.max_client_weight: a client has weight 3000") as refused:
        secure_weight_bound(SecureConfig(max_client_weight=2048), 10, 3000)
    assert "\n" not in str(refused.value)
    with pytest.raises(config_lib.ConfigError, match="secure.bits: 16 bits leave too little precision"):
        secure_weight_bound(SecureConfig(bits=16), 10, 3000)


@pytest.mark.unit
def test_the_scale_leaves_room_for_the_sum_of_the_weights():
    # 10 clients of weight up to 3,300 in 16 bits: the weights alone sum to 33,000 > 2^15 - 1.
    bits, clients, max_weight = 16, 10, 3300
    assert secagg.fixed_point_scale(bits, CLIP, max_weight, clients) == 0.0
    weights = secagg.encode(np.zeros(3), max_weight, CLIP, 1.0, max_weight, bits)
    wrapped = secagg.to_signed(sum([weights] * clients) & secagg.modulus_mask(bits), bits)
    assert wrapped[-1] != clients * max_weight  # what a non-zero scale would have let through
    # Just below the limit the weight decodes exactly, every coordinate at the clipping bound too.
    max_weight = (2 ** (bits - 1) - 1) // clients
    scale = secagg.fixed_point_scale(bits, CLIP, max_weight, clients)
    assert scale > 0
    update = np.array([CLIP, 0.0, 0.0])
    encoded = secagg.encode(update, max_weight, CLIP, scale, max_weight, bits)
    mean, weight = secagg.decode_mean(sum([encoded] * clients) & secagg.modulus_mask(bits), scale, bits)
    assert weight == clients * max_weight and mean[0] == pytest.approx(CLIP, abs=0.5 / scale)


@pytest.mark.unit
@pytest.mark.parametrize("call, message", [
    (lambda: secagg.decode_mean(np.zeros(4, dtype=np.uint64), 0.0, BITS), "scale must be a finite number above 0"),
    (lambda: secagg.encode(np.zeros(3), 1, CLIP, 0.0, 10, BITS), "scale must be a finite number above 0"),
    (lambda: secagg.encode(np.zeros(3), 1, CLIP, float("inf"), 10, BITS), "scale must be a finite number above 0"),
    (lambda: secagg.fixed_point_scale(BITS, 0.0, 10, 5), "clip must be a finite number above 0"),
    (lambda: secagg.fixed_point_scale(BITS, CLIP, 0, 5), "max_weight must be an integer of at least 1"),
    (lambda: secagg.fixed_point_scale(BITS, CLIP, 10, 0), "num_clients must be an integer of at least 1"),
    (lambda: secagg.fixed_point_scale(65, CLIP, 10, 5), "bits must be an integer from 2 to 64"),
    (lambda: secagg.run_protocol(integer_inputs(3), threshold=2, bits=0), "bits must be an integer from 2 to 64"),
])
def test_fixed_point_and_protocol_parameters_are_validated(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- Rounds of SecureFedAvg on TFF ------------------------------------------------------------------

EPOCHS = 5  # make_federated_data's default, the article's NUM_EPOCHS


def example_count(client_data, client_id: str) -> int:
    return sum(1 for _ in client_data.create_tf_dataset_for_client(client_id).as_numpy_iterator())


def datasets_builder(client_data):
    """FedAvg on the article's datasets (`client_input: datasets`) over `client_data`, as a mode builds from it."""
    from fedmnist.algorithms.fedavg import FedAvg
    from fedmnist.experiment import process_builder
    from fedmnist.model import build_model_fn

    config = config_lib.load(None, ["client_input=datasets"])
    return process_builder(config, build_model_fn(), FedAvg(config), client_data)


@pytest.fixture(scope="module")
def digits_population(tff_runtime):
    """20 clients of scikit-learn's digits and the largest weight among them (examples x epochs)."""
    from fedmnist.data import load_digits

    client_data = load_digits(20).train
    return client_data, datasets_builder(client_data).largest_client_weight()


def secure_process(settings: SecureConfig, threshold: int, clients: int, largest: int | None,
                   max_weight: int | None = None):
    """SecureFedAvg with the weight bound derived from `largest` (checked as a run checks it), or
    `max_weight` unchecked."""
    from fedmnist.privacy.secure import secure_weight_bound
    from fedmnist.privacy.secure_process import SecureFedAvg

    bound = max_weight or secure_weight_bound(settings, clients, largest)
    return SecureFedAvg(datasets_builder(load_digits_once()), settings, threshold, clients, bound)


def load_digits_once():
    from fedmnist.data import load_digits

    return load_digits(20).train


def plain_round(data: list) -> tuple[list[np.ndarray], dict]:
    """TFF's weighted FedAvg, as `aggregation: plain` runs it, from the article's initial model."""
    import tensorflow_federated as tff

    from fedmnist.model import build_model_fn, initial_weights

    plain = tff.learning.algorithms.build_weighted_fed_avg(
        build_model_fn(), tff.learning.optimizers.build_sgdm(0.02), tff.learning.optimizers.build_sgdm(1.0))
    output = plain.next(plain.set_model_weights(plain.initialize(), initial_weights("linear", 10, 0)), data)
    return list(plain.get_model_weights(output.state).trainable), output.metrics["client_work"]


def secure_round(secure, data: list, round_num: int):
    from fedmnist.model import initial_weights

    secure.begin_round(round_num)
    start = secure.set_model_weights(secure.initialize(), initial_weights("linear", 10, 0))
    output = secure.next(start, data)
    return output, list(secure.get_model_weights(start).trainable)


def assert_close(secure, output, expected: list[np.ndarray]) -> None:
    step = output.metrics["aggregator"]["secure"]["quantization_step"]
    for ours, theirs in zip(secure.get_model_weights(output.state).trainable, expected):
        assert np.max(np.abs(ours - theirs)) <= 0.5 * step + 1e-6


def test_clients_dropped_before_their_input_train_nothing_and_stay_out_of_the_metrics(digits_population):
    from fedmnist.data import make_federated_data

    digits, largest = digits_population
    ids = digits.client_ids[:6]
    data = make_federated_data(digits, ids)
    secure = secure_process(SecureConfig(dropout=0.3), threshold=4, clients=6, largest=largest)
    output, _ = secure_round(secure, data, round_num=2)
    report = output.metrics["aggregator"]["secure"]
    assert report["failed"] == 0 and report["dropped"] > 0, "the seeded dropouts of round 2 should drop some"
    survivors = sorted(secure.last_view.masked_inputs)  # the clients the server heard from
    assert len(survivors) == 6 - report["dropped"] and len(secure.last_view.public_keys) == 6
    kept = [ids[u - 1] for u in survivors]
    examples = EPOCHS * sum(example_count(digits, cid) for cid in kept)
    assert output.metrics["client_work"]["train"]["num_examples"] == examples == report["total_weight"]
    # Loss, accuracy and model: exactly a plain round of the survivors alone (the same datasets: a
    # dataset built again would shuffle differently).
    weights, metrics = plain_round([data[u - 1] for u in survivors])
    assert output.metrics["client_work"] == metrics
    assert_close(secure, output, weights)


def test_clients_that_drop_after_their_input_stay_in_the_sum_and_too_many_skip_the_round(digits_population):
    from fedmnist.data import make_federated_data

    digits, largest = digits_population
    data = make_federated_data(digits, digits.client_ids[:6])
    secure = secure_process(SecureConfig(dropout_after_input=0.5), threshold=4, clients=6, largest=largest)
    output, _ = secure_round(secure, data, round_num=4)
    report = output.metrics["aggregator"]["secure"]
    assert report["failed"] == 0 and report["dropped"] == 0 and report["dropped_after_input"] == 2, \
        "the seeded dropouts of round 4 should drop two clients after their input"
    assert len(secure.last_view.masked_inputs) == 6 and len(secure.last_view.unmasking) == 4
    weights, metrics = plain_round(data)
    assert output.metrics["client_work"] == metrics
    assert_close(secure, output, weights)

    secure = secure_process(SecureConfig(dropout_after_input=0.99), threshold=4, clients=6, largest=largest)
    output, start = secure_round(secure, data, round_num=1)
    report = output.metrics["aggregator"]["secure"]
    assert report["failed"] == 1 and "stayed to unmask" in report["error"] and "global model kept" in report["error"]
    for ours, before in zip(secure.get_model_weights(output.state).trainable, start):
        np.testing.assert_array_equal(ours, before)


@pytest.fixture(scope="module")
def population_with_a_large_client(tff_runtime):
    """Six clients of scikit-learn's digits: one with 600 examples (weight 3,000 at 5 epochs, above the
    old silent cap of 2,048), five with 40."""
    from fedmnist.data import client_data_from_arrays, digits_as_emnist

    pixels, labels = digits_as_emnist()
    sizes = {"large": 600, **{f"small_{i}": 40 for i in range(5)}}
    clients, start = {}, 0
    for cid, size in sizes.items():
        clients[cid] = (pixels[start:start + size], labels[start:start + size])
        start += size
    return client_data_from_arrays(clients)


def test_secure_equals_plain_with_a_client_above_the_old_weight_cap(population_with_a_large_client):
    from fedmnist.data import make_federated_data

    client_data = population_with_a_large_client
    largest = datasets_builder(client_data).largest_client_weight()
    assert largest == EPOCHS * example_count(client_data, "large") == 3000
    data = make_federated_data(client_data, client_data.client_ids)
    # The large client's update has an L2 norm of about 2, the default clip: a clip of 4 leaves every
    # update unclipped, so what is compared is the weighting alone.
    secure = secure_process(SecureConfig(clip=4.0), threshold=4, clients=6, largest=largest)
    assert secure.max_weight == 3000
    output, _ = secure_round(secure, data, round_num=1)
    assert output.metrics["aggregator"]["secure"]["total_weight"] == EPOCHS * (600 + 5 * 40)
    weights, _ = plain_round(data)
    assert_close(secure, output, weights)

    # An explicit bound below the population's largest weight is refused in one line ...
    with pytest.raises(config_lib.ConfigError, match="secure.max_client_weight: a client has weight 3000"):
        secure_process(SecureConfig(max_client_weight=2048), threshold=4, clients=6, largest=largest)
    # ... and a client above it, if the population was not checked, fails the round instead of being capped.
    unchecked = secure_process(SecureConfig(max_client_weight=2048), threshold=4, clients=6, largest=None,
                               max_weight=2048)
    with pytest.raises(ValueError, match="client weight of 3000 is outside 0..2048"):
        secure_round(unchecked, data, round_num=1)


def test_the_training_derives_the_weight_bound_from_the_population(population_with_a_large_client):
    from fedmnist.privacy.secure import Secure

    config = config_lib.load(None, ["aggregation=secure", "clients_per_round=6"])
    training = Secure(config).build(datasets_builder(population_with_a_large_client))
    assert training.process.max_weight == 3000
