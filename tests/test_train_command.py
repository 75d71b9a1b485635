"""`python -m fedmnist.train` end to end, as a user runs it: a subprocess on the offline data, run once,
with many checks on what it printed and left behind."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from fedmnist import config as config_lib
from fedmnist import data
from helpers import ROOT, Background, logged_workers, metrics_rows, run_cli, scalars, train_main

TRAIN_TAGS = {"loss/local_training": "loss", "accuracy/local_training": "sparse_categorical_accuracy"}


def digits_cli(directory: Path):
    run_dir = directory / "digits"
    (directory / "tmp").mkdir()
    done = run_cli("--dataset", "digits", "--rounds", "2", "--run-dir", str(run_dir), "--quiet", cwd=ROOT,
                   env={"TMPDIR": str(directory / "tmp")})
    return run_dir, done


BACKGROUND = {"digits_run": Background(digits_cli)}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The run the assertions below read: run once, in the background from the start of the session."""
    return BACKGROUND["digits_run"].result(tmp_path_factory)


def test_digits_run_prints_rounds_and_final_accuracy(digits_run):
    run_dir, done = digits_run
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"run directory: {run_dir}"
    assert [line.split(",")[0] for line in lines if re.match(r"round +\d+,", line)] == ["round  1", "round  2"]
    assert any(line.startswith("final: evaluation on training data accuracy") for line in lines)
    assert "Traceback" not in done.stderr


def test_run_directory_holds_well_formed_outputs(digits_run):
    run_dir, _ = digits_run
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved.pop("versions")["tensorflow-federated"] == "0.87.0"
    config = config_lib.from_dict(resolved)
    assert config.rounds == 2 and config.data.dataset == "digits"

    rows = metrics_rows(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    assert all(len(row["clients"]) == 10 and row["seconds"] > 0 for row in rows)
    assert rows[0]["train"]["num_examples"] == rows[1]["train"]["num_examples"] > 0
    assert "eval" not in rows[0] and set(rows[1]["eval"]) == {"train", "test"}

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "digits" and summary["rounds"] == 2 and summary["num_clients"] == 20
    assert summary["local_training"] == rows[-1]["train"]
    assert [summary["evaluation_on_training_data"], summary["evaluation_on_test_data"]] == [
        rows[-1]["eval"]["train"], rows[-1]["eval"]["test"]]
    assert summary["total_seconds"] > sum(row["seconds"] for row in rows)
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_tensorboard_scalars_match_the_metrics_log(digits_run):
    run_dir, _ = digits_run
    rows = metrics_rows(run_dir)
    logged = scalars(run_dir)
    for tag, metric in TRAIN_TAGS.items():
        assert logged[tag] == [(r["round"], pytest.approx(r["train"][metric], rel=1e-6)) for r in rows]
    assert logged["accuracy/evaluation_on_test_data"] == [
        (2, pytest.approx(rows[1]["eval"]["test"]["sparse_categorical_accuracy"], rel=1e-6))]
    assert [step for step, _ in logged["round/seconds"]] == [1, 2]


def test_saved_model_predicts_what_federated_evaluation_measured(digits_run):
    run_dir, _ = digits_run
    summary = json.loads((run_dir / "summary.json").read_text())
    keras_model = tf.keras.models.load_model(run_dir / "model.keras")
    dataset = data.load_digits(num_clients=20, seed=0)
    pixels, labels = [], []
    for client_id in dataset.test.client_ids[:summary["evaluation_clients"]]:
        for example in dataset.test.create_tf_dataset_for_client(client_id).as_numpy_iterator():
            pixels.append(example["pixels"].reshape(784))
            labels.append(example["label"])
    probabilities = keras_model.predict(np.stack(pixels), verbose=0)
    assert probabilities.shape == (len(labels), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == np.array(labels)))
    assert accuracy == pytest.approx(summary["evaluation_on_test_data"]["sparse_categorical_accuracy"], abs=1e-6)


def test_worker_is_gone_after_the_run(digits_run):
    run_dir, _ = digits_run
    assert not logged_workers(run_dir)[0].alive()


def test_the_run_leaves_nothing_in_the_temporary_directory(digits_run):
    # TensorFlow's AutoGraph writes a file there for every function it converts, and removes them at the
    # interpreter's exit, which the command skips (fedmnist.train.exit_now).
    run_dir, _ = digits_run
    assert list((run_dir.parent / "tmp").iterdir()) == []


def test_an_existing_run_is_never_overwritten_unasked(digits_run):
    run_dir, _ = digits_run
    before = (run_dir / "metrics.jsonl").read_bytes()
    done = run_cli("--dataset", "digits", "--rounds", "1", "--run-dir", str(run_dir), cwd=ROOT)
    assert done.returncode == 2 and "already exists" in done.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--rounds", "0"], "rounds: must be at least 1"),
    (["--dataset", "imagenet"], "data.dataset: 'imagenet' is not one of"),
    (["--set", "roundz=3"], "did you mean 'rounds'?"),
    (["--rounds", "two"], "invalid int value"),
    (["--config", "no/such.yaml"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    done = run_cli(*args, "--run-dir", str(tmp_path / "run"), cwd=ROOT)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert not (tmp_path / "run").exists()


def test_synthetic_run_with_sampling_and_evaluation_every_round(tmp_path):
    # In this process: the command's options and outputs, not a fresh process, are the point here.
    run_dir = tmp_path / "synthetic"
    done = train_main("--dataset", "synthetic", "--rounds", "2", "--clients-per-round", "4",
                      "--set", "client_selection=uniform", "--set", "eval_every=1", "--set", "eval_clients=0",
                      "--run-dir", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "final: evaluation on training data accuracy" in done.stdout
    rows = metrics_rows(run_dir)
    assert all(len(row["clients"]) == 4 and "eval" in row for row in rows)
    assert rows[0]["clients"] != rows[1]["clients"]  # a fresh seeded sample each round
    assert rows[0]["eval"]["test"]["num_examples"] == sum(
        len(list(ds)) for ds in data.make_federated_data(
            data.load_synthetic(num_clients=20, seed=0).test, [f"client_{i:02d}" for i in range(20)],
            epochs=1, batch_size=1))
    assert (run_dir / "model.keras").is_file()
    assert not logged_workers(run_dir)[0].alive()
