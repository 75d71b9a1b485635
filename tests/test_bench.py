"""The benchmark (fedmnist.bench): its plain-TensorFlow floor does the package's SGD steps, and its
package path measures `loop.train` on the population it is given."""

from __future__ import annotations

import pytest

from fedmnist import config as config_lib
from fedmnist import data
from fedmnist.bench.floor import round_clients, run_floor
from fedmnist.bench.report import AGREEMENT_TOLERANCE, agreement_tolerance
from fedmnist.bench.workloads import WORKLOAD_SPECS, run_package
from fedmnist.experiment import prepared_clients
from helpers import ROOT, small_config


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


def test_paper_round_workload_is_mcmahans_fedavg_cnn_round():
    """`paper-round`: the shipped E=5 B=10 CNN config's training settings on 100 synthetic clients of
    600 training examples, 10 per round; built, not run."""
    config = config_lib.load(None, list(WORKLOAD_SPECS["paper-round"].overrides))
    paper = config_lib.load(ROOT / "configs" / "mcmahan2017" / "cnn-fedavg-e5-b10-iid.yaml")
    for settings in (lambda c: (c.seed, c.model, c.clients_per_round, c.client_selection),
                     lambda c: (c.data.num_clients, c.data.partition),
                     lambda c: (c.preprocess.epochs, c.preprocess.batch_size, c.preprocess.shuffle_buffer,
                                c.preprocess.shuffle, c.preprocess.shuffle_seed),
                     lambda c: (c.client_optimizer, c.server_optimizer)):
        assert settings(config) == settings(paper)
    assert (config.model, config.data.num_clients, config.clients_per_round) == ("cnn", 100, 10)
    assert (config.preprocess.epochs, config.preprocess.batch_size) == (5, 10)
    assert config.client_optimizer.learning_rate == 0.05 and config.client_input == "prepared"
    assert config.centralized_eval_every is None, "a timed evaluation the floor does not do"

    dataset = data.load_dataset(config.data, config.seed)
    assert len(dataset.train.client_ids) == 100
    assert {int(dataset.train.create_tf_dataset_for_client(c).cardinality())
            for c in dataset.train.client_ids} == {600}
    clients = round_clients(config, dataset.train.client_ids)(1)
    assert len(clients) == 10
    prepared = prepared_clients(config, dataset.train).dataset(clients[0], 1)
    order = prepared.get_single_element()["order"].numpy()
    assert len(order) == 600 * 5 and sorted(set(order)) == list(range(600))   # 300 steps of 10
