"""The four aggregation modes through TFF and the round loop, on the offline digits data."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedmnist import aggregation, config as config_lib, loop, runtime, secagg
from fedmnist.data import load_digits, make_federated_data
from fedmnist.model import build_model_fn, initial_weights
from fedmnist.secure_process import SecureFedAvg

ROUNDS = 2
COMMON = ["data.dataset=digits", f"rounds={ROUNDS}", "client_selection=uniform", "eval_clients=0"]


def run(tmp_path_factory, name: str, *overrides: str) -> tuple[dict, list[dict], list[str], object]:
    config = config_lib.load(None, COMMON + list(overrides))
    run_dir = tmp_path_factory.mktemp(name)
    lines: list[str] = []
    summary = loop.train(config, run_dir, echo=lines.append, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, lines, run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {
        "plain": run(tmp_path_factory, "plain"),
        "secure": run(tmp_path_factory, "secure", "aggregation=secure", "secure.dropout=0.2"),
        "secure-exact": run(tmp_path_factory, "secure-exact", "aggregation=secure"),
        "dp": run(tmp_path_factory, "dp", "aggregation=dp", "dp.noise_multiplier=0.3"),
        "compressed": run(tmp_path_factory, "compressed", "aggregation=compressed", "compression.threshold=1000"),
    }


def final_weights(run_dir) -> list[np.ndarray]:
    return tf.keras.models.load_model(run_dir / loop.MODEL_FILE).get_weights()


def test_secure_training_matches_plain_within_the_quantization_error(runs):
    plain_summary, _, _, plain_dir = runs["plain"]
    secure_summary, rows, _, secure_dir = runs["secure-exact"]
    step = rows[0]["aggregation"]["quantization_step"]
    for split in ("train", "test"):
        assert secure_summary["eval"][split]["sparse_categorical_accuracy"] == pytest.approx(
            plain_summary["eval"][split]["sparse_categorical_accuracy"], abs=0.01)
        assert secure_summary["eval"][split]["loss"] == pytest.approx(plain_summary["eval"][split]["loss"], abs=1e-3)
    # Each round's mean update is off by at most half a step per weight; the server applies it with
    # learning rate 1, so after ROUNDS rounds the models differ by about ROUNDS half-steps at most.
    for secure, plain in zip(final_weights(secure_dir), final_weights(plain_dir)):
        assert np.max(np.abs(secure - plain)) <= ROUNDS * step
    assert plain_summary["aggregation"]["mode"] == "plain"


def test_secure_rounds_report_dropouts_and_protocol_bytes(runs):
    summary, rows, lines, _ = runs["secure"]
    reports = [row["aggregation"] for row in rows]
    assert sum(r["dropped"] for r in reports) == summary["aggregation"]["dropped_clients"] > 0
    for report in reports:
        assert report["failed"] == 0 and report["clients"] == 10
        assert report["total_weight"] > 0
        # Masked vector (4 bytes per weight and the weight) plus keys, shares and unmasking.
        assert report["bytes_per_client"] > 4 * 7851 and report["extra_bytes_per_client"] > 0
    assert sum("secure sum of" in line for line in lines) == ROUNDS
    assert summary["eval"]["test"]["sparse_categorical_accuracy"] > 0.25  # chance is 0.1


def test_too_many_dropouts_fail_the_round_and_keep_the_model(tmp_path_factory):
    summary, rows, lines, run_dir = run(tmp_path_factory, "abort", "aggregation=secure", "secure.dropout=0.9",
                                        "rounds=2")
    assert summary["aggregation"]["failed_rounds"] == 2
    for row in rows:
        report = row["aggregation"]
        assert "aborted" in report["error"] and "global model kept" in report["error"]
        assert report["dropped"] > 10 - report["threshold"]
        assert report["bytes_per_client"] > 0  # keys and shares were sent before the round aborted
    assert sum("aborted" in line for line in lines) == 2
    # No round succeeded: the saved model is still the article's all-zero initial model.
    assert all(not np.any(w) for w in final_weights(run_dir))


def test_dp_reports_increasing_epsilon_per_round_and_in_summary(runs):
    summary, rows, lines, _ = runs["dp"]
    epsilons = [row["aggregation"]["epsilon"] for row in rows]
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == ROUNDS
    assert summary["aggregation"]["epsilon"] == epsilons[-1]
    assert summary["aggregation"]["delta"] == pytest.approx(1 / 20 ** 1.1)
    assert summary["aggregation"]["sampling_rate"] == pytest.approx(10 / 20)
    assert sum("privacy spent: epsilon" in line for line in lines) == ROUNDS


def test_dp_epsilon_follows_rounds_noise_and_sampling():
    base = aggregation.dp_epsilon(1.0, 0.1, 10, 1e-5)
    assert aggregation.dp_epsilon(1.0, 0.1, 20, 1e-5) > base
    assert aggregation.dp_epsilon(2.0, 0.1, 10, 1e-5) < base
    assert aggregation.dp_epsilon(1.0, 0.01, 10, 1e-5) < base
    assert aggregation.dp_epsilon(0.0, 0.1, 10, 1e-5) == math.inf


def test_compressed_upload_is_smaller_than_float32(runs):
    summary, rows, lines, _ = runs["compressed"]
    report = summary["aggregation"]
    assert report["uncompressed_bits_per_client"] == 32 * 7851
    # 8-bit kernel (7,840 values) and float32 bias and weight: about a quarter of the float32 size.
    assert 8 * 7840 < report["upload_bits_per_client"] < 0.35 * report["uncompressed_bits_per_client"]
    assert all(row["aggregation"]["upload_bits_per_client"] == report["upload_bits_per_client"] for row in rows)
    assert lines[1].startswith("compression: 1 of the update's tensors quantized to 8 bits")
    plain = runs["plain"][0]["eval"]["test"]["sparse_categorical_accuracy"]
    assert summary["eval"]["test"]["sparse_categorical_accuracy"] == pytest.approx(plain, abs=0.05)


def test_encoded_bits_measure_tffs_encoder():
    assert aggregation.encoded_bits((10,), 8, 1000) == 32 * 10  # small tensors go as float32
    for bits in (2, 8, 16):
        measured = aggregation.encoded_bits((784, 10), bits, 1000)
        assert bits * 7840 + 64 <= measured < 32 * 7840
    assert aggregation.encoded_bits((784, 10), 8, 1000) < aggregation.encoded_bits((784, 10), 16, 1000)


def test_compression_aggregator_defaults_are_tffs():
    value_type = tff.types.to_type([(np.float32, (784, 10)), (np.float32, (10,))])
    ours = aggregation.compression_aggregator().create(value_type, tff.TensorType(np.float32))
    theirs = tff.learning.compression_aggregator().create(value_type, tff.TensorType(np.float32))
    assert ours.next.type_signature == theirs.next.type_signature
    assert ours.initialize.type_signature == theirs.initialize.type_signature


@pytest.fixture(scope="module")
def digits_round():
    dataset = load_digits(20)
    data = make_federated_data(dataset.train, dataset.train.client_ids[:6])
    with runtime.local_runtime():
        yield data


def test_one_secure_round_equals_tffs_weighted_fed_avg(digits_round):
    model_fn = build_model_fn()
    settings = config_lib.SecureConfig()
    secure = SecureFedAvg(model_fn, config_lib.OptimizerConfig(), config_lib.OptimizerConfig(learning_rate=1.0),
                          settings, threshold=4, clients_per_round=6)
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
                                secure.scale, settings.max_client_weight, settings.bits)
        masked = secagg.unpack(view.masked_inputs[number], view.length, settings.bits)
        assert np.count_nonzero(masked == encoded) < 10  # chance agreements of random 32-bit values


def test_aborted_secure_round_returns_the_previous_state(digits_round):
    secure = SecureFedAvg(build_model_fn(), config_lib.OptimizerConfig(), config_lib.OptimizerConfig(learning_rate=1.0),
                          config_lib.SecureConfig(dropout=0.99), threshold=4, clients_per_round=6)
    state = secure.set_model_weights(secure.initialize(), initial_weights("linear", 10, 0))
    output = secure.next(state, digits_round)
    report = output.metrics["aggregator"]["secure"]
    assert report["failed"] == 1 and report["dropped"] > 2
    for a, b in zip(secure.get_model_weights(output.state).trainable, secure.get_model_weights(state).trainable):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("overrides, message", [
    (["--set", "aggregation=dp"], "aggregation: dp needs client_selection: uniform"),
    (["--set", "aggregation=dp", "--set", "client_selection=uniform", "--set", "dp.noise_multiplier=2"],
     "dp.noise_multiplier: with 10 clients per round"),
    (["--set", "aggregation=secure", "--set", "secure.threshold=11"], "secure.threshold: 11 is more than"),
    (["--set", "aggregation=secure", "--set", "secure.bits=12"], "secure.bits: 12 bits leave too little precision"),
])
def test_unaccountable_or_impossible_configs_are_refused(tmp_path, overrides, message):
    result = subprocess.run([sys.executable, "-m", "fedmnist.train", "--dataset", "digits", *overrides],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "runs").exists()


def test_secure_rounds_with_too_few_available_clients_are_skipped_not_fatal(tmp_path):
    from fedmnist import config as config_lib
    from fedmnist import loop

    config = config_lib.load(None, [
        "data.dataset=synthetic", "data.num_clients=8", "clients_per_round=6", "client_selection=uniform",
        "rounds=4", "preprocess.epochs=1", "aggregation=secure", "secure.threshold=5",
        "availability.model=daily", "availability.dropout=0.5", "availability.min_clients=1"])
    loop.train(config, tmp_path, echo=lambda line: None, progress=False)
    rows = loop.MetricsLog(tmp_path).rows()
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    trained = [row for row in rows if "train" in row]
    short = [row for row in trained if row["participation"]["completed"] < 5]
    assert short, "the seeded dropouts should leave some round below the threshold"
    assert all(row["aggregation"]["failed"] == 1 for row in short)
