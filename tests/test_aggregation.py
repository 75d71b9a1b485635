"""The aggregation modes (fedmnist.aggregation, fedmnist.privacy) through the round loop, on the offline
digits data: what each reports per round and in the summary, and the configs it refuses."""

import math

import numpy as np
import pytest

from fedmnist import config as config_lib
from fedmnist.outputs.metrics_log import MetricsLog
from helpers import final_weights, metrics_rows, quiet_train, train_main

ROUNDS = 2
COMMON = ["data.dataset=digits", f"rounds={ROUNDS}", "client_selection=uniform", "eval_clients=0"]


def run(tmp_path_factory, name: str, *overrides: str) -> tuple[dict, list[dict], list[str], object]:
    from fedmnist import loop

    config = config_lib.load(None, COMMON + list(overrides))
    run_dir = tmp_path_factory.mktemp(name)
    lines: list[str] = []
    summary = loop.train(config, run_dir, echo=lines.append, progress=False)
    return summary, metrics_rows(run_dir), lines, run_dir


MODES = {
    "plain": (),
    "dp-deterministic": ("aggregation=dp", "dp.noise_multiplier=0", "dp.public_sample=true"),
    "compressed-unquantized": ("aggregation=compressed", "compression.threshold=100000"),
    "secure": ("aggregation=secure", "secure.dropout=0.2"),
    "secure-exact": ("aggregation=secure",),
    "dp": ("aggregation=dp", "dp.noise_multiplier=0.3"),
    "compressed": ("aggregation=compressed", "compression.threshold=1000"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`runs(name)`: the run of one of MODES, trained on first use (so one mode's failure is its own)."""
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = run(tmp_path_factory, name, *MODES[name])
        return done[name]

    return get


def test_secure_training_matches_plain_within_the_quantization_error(runs):
    plain_summary, _, _, plain_dir = runs("plain")
    secure_summary, rows, _, secure_dir = runs("secure-exact")
    step = rows[0]["aggregation"]["quantization_step"]
    for key in ("evaluation_on_training_data", "evaluation_on_test_data"):
        assert secure_summary[key]["sparse_categorical_accuracy"] == pytest.approx(
            plain_summary[key]["sparse_categorical_accuracy"], abs=0.01)
        assert secure_summary[key]["loss"] == pytest.approx(plain_summary[key]["loss"], abs=1e-3)
    # Each round's mean update is off by at most half a step per weight; the server applies it with
    # learning rate 1, so after ROUNDS rounds the models differ by about ROUNDS half-steps at most.
    for secure, plain in zip(final_weights(secure_dir), final_weights(plain_dir)):
        assert np.max(np.abs(secure - plain)) <= ROUNDS * step
    # The float32 mean uploads every weight and the example weight, 4 bytes each.
    weights = sum(w.size for w in final_weights(plain_dir))
    assert plain_summary["aggregation"]["upload_bytes_per_client"] == 4 * (weights + 1)


@pytest.mark.parametrize("mode", ["compressed-unquantized", "secure-exact", "dp-deterministic"])
def test_every_mode_trains_the_same_on_prepared_tensors_and_the_articles_datasets(runs, tmp_path_factory, mode):
    # `client_input` is honoured by every mode (the default, prepared, above; the article's pipelines here).
    # Each mode drawing nothing at random: dp without noise and with the public sample, compressed with no
    # tensor large enough to quantize (its quantization rounds stochastically), secure without dropouts.
    _, prepared, _, _ = runs(mode)
    _, datasets, _, _ = run(tmp_path_factory, f"{mode}-datasets", *MODES[mode], "client_input=datasets")
    assert [r["clients"] for r in prepared] == [r["clients"] for r in datasets]
    for a, b in zip(prepared, datasets, strict=True):
        for key in ("loss", "sparse_categorical_accuracy", "num_examples"):
            assert a["train"][key] == pytest.approx(b["train"][key], abs=1e-5), (mode, a["round"], key)


def test_secure_rounds_report_dropouts_and_protocol_bytes(runs):
    summary, rows, lines, _ = runs("secure")
    reports = [row["aggregation"] for row in rows]
    assert sum(r["dropped"] for r in reports) == summary["aggregation"]["dropped_clients"] > 0
    for report in reports:
        assert report["failed"] == 0 and report["clients"] == 10
        assert report["total_weight"] > 0
        # Masked vector (4 bytes per weight and the weight) plus keys, shares and unmasking.
        assert report["bytes_per_client"] > 4 * 7851 and report["extra_bytes_per_client"] > 0
    assert sum("secure sum of" in line for line in lines) == ROUNDS
    assert summary["aggregation"]["upload_bytes_per_client"] > 4 * 7851  # the protocol's bytes, not float32's
    assert summary["evaluation_on_test_data"]["sparse_categorical_accuracy"] > 0.25  # chance is 0.1


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
    summary, rows, lines, _ = runs("dp")
    epsilons = [row["aggregation"]["epsilon"] for row in rows]
    assert all(math.isfinite(e) and e > 0 for e in epsilons)
    assert epsilons == sorted(epsilons) and len(set(epsilons)) == ROUNDS
    assert summary["aggregation"]["epsilon"] == epsilons[-1]
    assert summary["aggregation"]["delta"] == pytest.approx(0.01 / 20)
    assert summary["aggregation"]["sampling"] == "poisson"
    assert summary["aggregation"]["sampling_rate"] == pytest.approx(10 / 20)
    assert sum("privacy spent: epsilon" in line for line in lines) == ROUNDS


def test_compressed_upload_is_smaller_than_float32(runs):
    summary, rows, lines, _ = runs("compressed")
    report = summary["aggregation"]
    assert report["uncompressed_bits_per_client"] == 32 * 7851
    # 8-bit kernel (7,840 values) and float32 bias and weight: about a quarter of the float32 size.
    assert 8 * 7840 < report["upload_bits_per_client"] < 0.35 * report["uncompressed_bits_per_client"]
    assert all(row["aggregation"]["upload_bits_per_client"] == report["upload_bits_per_client"] for row in rows)
    assert lines[1].startswith("compression: 1 of the update's tensors quantized to 8 bits")
    plain = runs("plain")[0]["evaluation_on_test_data"]["sparse_categorical_accuracy"]
    assert summary["evaluation_on_test_data"]["sparse_categorical_accuracy"] == pytest.approx(plain, abs=0.05)


@pytest.mark.parametrize("overrides, message", [
    (["--set", "aggregation=dp"], "aggregation: dp needs client_selection: uniform"),
    (["--set", "aggregation=dp", "--set", "client_selection=uniform", "--set", "dp.noise_multiplier=2"],
     "dp.noise_multiplier: with 10 clients per round"),
    (["--set", "aggregation=secure", "--set", "secure.threshold=11"], "secure.threshold: 11 is more than"),
    (["--set", "aggregation=secure", "--set", "secure.bits=12"], "secure.bits: 12 bits leave too little precision"),
])
@pytest.mark.unit
def test_unaccountable_or_impossible_configs_are_refused(tmp_path, monkeypatch, overrides, message):
    monkeypatch.chdir(tmp_path)
    result = train_main("--dataset", "digits", *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "runs").exists()


def test_secure_rounds_with_too_few_available_clients_are_skipped_not_fatal(tmp_path):
    config = config_lib.load(None, [
        "data.dataset=synthetic", "data.num_clients=8", "clients_per_round=6", "client_selection=uniform",
        "rounds=4", "preprocess.epochs=1", "aggregation=secure", "secure.threshold=5",
        "availability.model=daily", "availability.dropout=0.5", "availability.min_clients=1"])
    quiet_train(config, tmp_path)
    rows = MetricsLog(tmp_path).rows()
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    trained = [row for row in rows if "train" in row]
    short = [row for row in trained if row["participation"]["completed"] < 5]
    assert short, "the seeded dropouts should leave some round below the threshold"
    assert all(row["aggregation"]["failed"] == 1 for row in short)
