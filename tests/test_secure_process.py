"""One secure-aggregation round (fedmnist.privacy.secure_process) against TFF's weighted FedAvg: the same
update within the quantization step, and a server that only ever sees masked vectors."""

import numpy as np
import pytest
import tensorflow_federated as tff

from fedmnist import config as config_lib
from fedmnist.privacy.secure import SecureConfig
from fedmnist import runtime
from fedmnist.data import load_digits, make_federated_data
from fedmnist.model import build_model_fn, initial_weights
from fedmnist.privacy import secagg
from fedmnist.privacy.secure import secure_weight_bound
from fedmnist.privacy.secure_process import SecureFedAvg


@pytest.fixture(scope="module")
def digits_round():
    """Six digits clients' preprocessed data, the population's largest client weight, and a worker."""
    dataset = load_digits(20)
    data = make_federated_data(dataset.train, dataset.train.client_ids[:6])
    with runtime.local_runtime():
        yield data, builder(dataset.train)


def builder(client_data):
    """FedAvg on the article's datasets, as `aggregation: secure` builds from it with `client_input: datasets`."""
    from fedmnist.algorithms.fedavg import FedAvg
    from fedmnist.experiment import process_builder

    config = config_lib.load(None, ["client_input=datasets"])
    return process_builder(config, build_model_fn(), FedAvg(config), client_data)


def secure_fed_avg(builder, settings: SecureConfig, threshold: int, clients: int) -> SecureFedAvg:
    bound = secure_weight_bound(settings, clients, builder.largest_client_weight())
    return SecureFedAvg(builder, settings, threshold, clients, bound)


def test_one_secure_round_equals_tffs_weighted_fed_avg(digits_round):
    digits_round, process_builder = digits_round
    model_fn = build_model_fn()
    settings = SecureConfig()
    secure = secure_fed_avg(process_builder, settings, threshold=4, clients=6)
    plain = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, tff.learning.optimizers.build_sgdm(0.02), tff.learning.optimizers.build_sgdm(1.0))
    start = initial_weights("linear", 10, 0)
    ours = secure.next(secure.set_model_weights(secure.initialize(), start), digits_round)
    theirs = plain.next(plain.set_model_weights(plain.initialize(), start), digits_round)
    step = ours.metrics["aggregator"]["secure"]["quantization_step"]
    for a, b in zip(secure.get_model_weights(ours.state).trainable, plain.get_model_weights(theirs.state).trainable):
        assert np.max(np.abs(a - b)) <= 0.5 * step + 1e-6
    assert ours.metrics["client_work"] == theirs.metrics["client_work"]
    # The server received masked vectors only: none is a client's encoded update.
    view = secure.last_view
    updates, weights, _ = secure.client_phase(secure.set_model_weights(secure.initialize(), start), digits_round)
    for number, (update, weight) in enumerate(zip(updates, weights), start=1):
        encoded = secagg.encode(np.concatenate([np.ravel(u) for u in update]), weight, settings.clip,
                                secure.scale, secure.max_weight, settings.bits)
        masked = secagg.unpack(view.masked_inputs[number], view.length, settings.bits)
        assert np.count_nonzero(masked == encoded) < 10  # chance agreements of random 32-bit values


def test_aborted_secure_round_returns_the_previous_state(digits_round):
    digits_round, process_builder = digits_round
    secure = secure_fed_avg(process_builder, SecureConfig(dropout=0.99), threshold=4, clients=6)
    state = secure.set_model_weights(secure.initialize(), initial_weights("linear", 10, 0))
    output = secure.next(state, digits_round)
    report = output.metrics["aggregator"]["secure"]
    assert report["failed"] == 1 and report["dropped"] > 2
    for a, b in zip(secure.get_model_weights(output.state).trainable, secure.get_model_weights(state).trainable):
        np.testing.assert_array_equal(a, b)
