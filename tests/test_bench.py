"""The benchmark (fedmnist.bench): its plain-TensorFlow floor does the package's SGD steps, and its
package path measures `loop.train` on the population it is given."""

from __future__ import annotations

import sys

import pytest

import helpers

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


@pytest.mark.unit
def test_no_workload_times_an_evaluation_the_floor_does_not_do():
    for name, spec in WORKLOAD_SPECS.items():
        config = config_lib.load(None, list(spec.overrides))
        assert (config.eval_every, config.centralized_eval_every) == (0, None), name


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
    assert config.client_optimizer.learning_rate == 0.2 and config.client_input == "prepared"
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


MARKS = {"python": 0.05, "config": 0.3, "tensorflow": 4.3, "tff": 6.5, "fedmnist": 6.55, "data": 6.8, "build": 8.3,
         "round 1": 9.3, "round 2": 9.5, "round 3": 10.5, "finish": 10.9, "stop": 11.0}


@pytest.mark.unit
def test_startup_phases_add_up_to_the_whole_run():
    from fedmnist.bench.startup import PHASES, phases

    p = phases({"marks": MARKS, "rounds": 3, "evaluation_seconds": 0.6}, seconds=11.1)
    assert p["imports"] == pytest.approx(6.25) and p["tensorflow"] + p["tff"] == pytest.approx(6.2)
    assert p["first round"] == pytest.approx(1.0) and p["rounds"] == pytest.approx(0.6)
    assert p["evaluation"] == 0.6 and p["outputs"] == pytest.approx(0.4) and p["exit"] == pytest.approx(0.1)
    assert p["tff_to_round_1"] == pytest.approx(2.8)
    assert sum(p[name] for name in PHASES) == pytest.approx(p["total"]) == 11.1


@pytest.mark.unit
def test_startup_report_states_each_target_as_met_or_not():
    from fedmnist.bench.startup import format_startup, phases, summarize

    row = {"phases": phases({"marks": MARKS, "rounds": 3, "evaluation_seconds": 0.6}, seconds=11.1),
           "final_eval": {}}
    runs = {"package": [{"seconds": s, "cpu_seconds": 10.0, "peak_rss_gb": 0.8, "first_line_s": 0.3,
                         "first_line": "run directory: x"} for s in (11.0, 12.0, 13.0)],
            "bare": [{"seconds": s, "cpu_seconds": 12.0, "peak_rss_gb": 0.7} for s in (15.0, 15.0, 14.0)],
            "phased": [row] * 3}
    result = summarize(runs)
    assert result["pair_ratios"] == pytest.approx([11 / 15, 12 / 15, 13 / 14]) and result["ratio"] == 12 / 15
    text = "\n".join(format_startup(result))
    assert "package / bare, paired: 0.80x" in text and "target <= 0.75x: NOT met" in text
    assert "TFF imported -> end of round 1: 2.80 s (target <= 3 s: met)" in text
    assert "first line of `python -m fedmnist.train`: 0.30 s" in text


def test_time_process_times_each_line_as_it_is_printed():
    from fedmnist.bench.whole_runs import time_process

    # Lower bounds only: a loaded machine delays the process and the reading of its lines, never hastens them.
    script = "import time; print('first', flush=True); time.sleep(1.0); print('second', flush=True)"
    run = time_process([sys.executable, "-c", script], lines=True)
    (first, text), (second, _) = run["lines"]
    assert text == "first" and 0 < first and second - first >= 0.5 and run["seconds"] >= 1.0
    assert run["stdout"] == "first\nsecond\n"


def test_a_timed_process_uses_the_benchmarks_own_temporary_directory(tmp_path, monkeypatch):
    # The bare TFF script and the phased run end without Python's teardown, so AutoGraph's module files stay
    # where they were written: there, they go with the benchmark's own directory.
    import tempfile

    from fedmnist.bench.whole_runs import time_process

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = time_process([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"])
    assert run["stdout"].strip() == str(tmp_path)


def test_startup_run_marks_every_phase_of_a_run(tmp_path):
    import json
    import time

    from fedmnist.bench.startup import PHASES, phases
    from fedmnist.bench.whole_runs import time_process

    launched = time.time()
    run = time_process([sys.executable, "-m", "fedmnist.bench.startup_run", str(tmp_path / "run"),
                        *helpers.SMALL, "rounds=2"], env={"FEDMNIST_BENCH_LAUNCHED": repr(launched)})
    child = json.loads(run["stdout"].strip().splitlines()[-1])
    assert list(child["marks"]) == ["python", "config", "tensorflow", "tff", "fedmnist", "data", "build",
                                    "round 1", "round 2", "finish", "stop"]
    p = phases(child, run["seconds"])
    assert all(p[name] >= 0 for name in PHASES) and p["evaluation"] > 0
    assert set(child["final_eval"]) == {"train", "test"}
