"""The benchmark (fedmnist.bench): its plain-TensorFlow floor does the package's SGD steps, and its
package path measures `loop.train` on the population it is given."""

from __future__ import annotations

import pytest

from fedmnist import data
from fedmnist.bench.floor import run_floor
from fedmnist.bench.report import AGREEMENT_TOLERANCE, agreement_tolerance
from fedmnist.bench.workloads import run_package
from helpers import small_config


def test_benchmark_floor_does_the_same_sgd_steps(prepared_run):
    floor = run_floor(small_config())
    assert len(floor["per_round"]) == len(prepared_run)
    for row, floor_row in zip(prepared_run, floor["per_round"]):
        assert floor_row["loss"] == pytest.approx(row["train"]["loss"], abs=1e-5)
        assert floor_row["accuracy"] == pytest.approx(row["train"]["sparse_categorical_accuracy"], abs=1e-6)
    assert floor["steady_s_per_round"] > 0 and floor["peak_rss_gb"] > 0
    # One ulp on every initial weight moves a linear model's rounds by float32 rounding at most.
    nudged = run_floor(small_config(), nudge_weights=True)
    tolerance, noise = agreement_tolerance({"floor": floor, "floor_nudged": nudged})
    assert noise < 1e-3 and tolerance == max(AGREEMENT_TOLERANCE, 2 * noise)
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(floor["per_round"], nudged["per_round"])) < 1e-5


def test_package_path_and_floor_train_a_given_population_alike(prepared_run):
    # Not the configured data: another seed's population, passed to both (as the `scale` workload does).
    population = data.load_synthetic(num_clients=8, examples_per_client=21, seed=11)
    package = run_package(small_config(), dataset=population)
    floor = run_floor(small_config(), dataset=population)
    assert package["rounds"] == floor["rounds"] == len(prepared_run)
    for mine, theirs in zip(package["per_round"], floor["per_round"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-6)
    assert [r["loss"] for r in package["per_round"]] != pytest.approx(
        [r["train"]["loss"] for r in prepared_run], abs=1e-3), "the given population was not used"
    assert package["steady_s_per_round"] > 0 and package["peak_rss_gb"] > 0
    assert sorted(package["rss_gb_by_round"]) == list(range(1, len(prepared_run) + 1))
