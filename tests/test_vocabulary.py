"""One vocabulary for what a run measures (fedmnist.outputs.records.MEASUREMENTS), everywhere a person reads
it: "local training" (the clients' metrics while they train, TFF's `client_work/train`), "evaluation on
training data" and "evaluation on test data" (federated evaluation), "centralized evaluation" (the server's
pooled test set). metrics.jsonl keeps its keys (`train`, `eval`)."""

from __future__ import annotations

import json
import re

import pytest

from fedmnist import config as config_lib
from fedmnist.outputs import console, targets
from fedmnist.outputs.records import MEASUREMENTS, RoundRecord
from helpers import metrics_rows, scalars

TRAIN = {"sparse_categorical_accuracy": 0.7322221994400024, "loss": 1.0477440357208252, "num_examples": 3600,
         "num_batches": 180}
EVAL = {"sparse_categorical_accuracy": 0.8611111044883728, "loss": 0.9585902094841003, "num_examples": 180,
        "num_batches": 10}
# Words that meant two things before: "train accuracy" was local training in the round lines and federated
# evaluation on training data in the final line.
AMBIGUOUS = re.compile(r"\btrain(ing)? (acc|accuracy|loss)\b|\beval on\b|\btest acc\b")


@pytest.mark.unit
def test_the_vocabulary():
    assert [(m.path, m.name, m.key) for m in MEASUREMENTS] == [
        (("train",), "local training", "local_training"),
        (("eval", "train"), "evaluation on training data", "evaluation_on_training_data"),
        (("eval", "test"), "evaluation on test data", "evaluation_on_test_data"),
        (("eval", "centralized"), "centralized evaluation", "centralized_evaluation")]


@pytest.mark.unit
def test_console_lines_say_what_was_measured():
    assert console.format_round(1, TRAIN) == ("round  1, local training metrics={'sparse_categorical_accuracy': "
                                              "0.7322, 'loss': 1.0477, 'num_examples': 3600, 'num_batches': 180}")
    assert console.format_eval("train", EVAL) == "evaluation on training data: loss=0.9586, accuracy=0.8611"
    assert console.format_eval("test", EVAL) == "evaluation on test data:     loss=0.9586, accuracy=0.8611"
    summary = {"evaluation_on_training_data": {"accuracy": 0.5}, "evaluation_on_test_data": EVAL,
               "total_seconds": 7.04}
    assert console.format_final(summary, "", "runs/x") == (
        "final: evaluation on training data accuracy 0.5000, evaluation on test data accuracy 0.8611, 7.0 s; "
        "outputs in runs/x")
    assert console.format_centralized(EVAL) == ("centralized evaluation on the pooled test set (180 examples): "
                                                "loss=0.9586, accuracy=0.8611")
    reached = {"evaluation": "test", "rounds": 1, "targets": {"0.97": None, "0.5": 1.0}}
    assert console.format_targets(reached) == ("rounds to test accuracy (evaluation on test data): "
                                               "0.97 not reached in 1 round, 0.5 in 1.0")
    assert targets.describe(None, 1) == "not reached in 1 round" and targets.count_rounds(2) == "2 rounds"


@pytest.mark.unit
def test_tensorboard_tags_put_the_learning_curves_first():
    record = RoundRecord(3, ["c"], {"selected": 10}, train=TRAIN, aggregation={"upload_bytes_per_client": 4.0},
                         eval={"train": EVAL, "test": {"loss": 1.0, "accuracy": 0.5}, "centralized": EVAL},
                         learning_rate={"client": 0.02}, seconds=0.25,
                         events=[{"event": "worker_restarted"}])
    tags = record.scalars()
    assert tags == {
        "accuracy/local_training": TRAIN["sparse_categorical_accuracy"], "loss/local_training": TRAIN["loss"],
        "round/local_training/num_examples": 3600, "round/local_training/num_batches": 180,
        "accuracy/evaluation_on_training_data": EVAL["sparse_categorical_accuracy"],
        "loss/evaluation_on_training_data": EVAL["loss"],
        "round/evaluation_on_training_data/num_examples": 180, "round/evaluation_on_training_data/num_batches": 10,
        "accuracy/evaluation_on_test_data": 0.5, "loss/evaluation_on_test_data": 1.0,  # a model's own "accuracy"
        "accuracy/centralized_evaluation": EVAL["sparse_categorical_accuracy"],
        "loss/centralized_evaluation": EVAL["loss"],
        "round/centralized_evaluation/num_examples": 180, "round/centralized_evaluation/num_batches": 10,
        "round/participation/selected": 10, "round/aggregation/upload_bytes_per_client": 4.0,
        "round/learning_rate/client": 0.02, "round/worker_restarts": 1, "round/seconds": 0.25}
    # TensorBoard sorts its groups by name: the learning curves come before everything else.
    assert sorted({tag.split("/")[0] for tag in tags}) == ["accuracy", "loss", "round"]


def run_lines(directory, *overrides: str) -> tuple[list[str], dict, list[dict]]:
    from fedmnist import loop

    config = config_lib.load(None, ["data.dataset=synthetic", "data.num_clients=4", "clients_per_round=2",
                                    "histogram_every=0", *overrides])
    lines: list[str] = []
    directory.mkdir()
    loop.train(config, directory, echo=lines.append, progress=False)
    return lines, json.loads((directory / "summary.json").read_text()), metrics_rows(directory)


def test_a_run_speaks_the_vocabulary_in_its_lines_summary_and_tensorboard(tmp_path):
    lines, summary, rows = run_lines(tmp_path / "run", "rounds=2", "eval_every=1", "centralized_eval_every=1")
    assert [line.split(" metrics=")[0] for line in lines if line.startswith("round ")] == [
        "round  1, local training", "round  2, local training"]
    assert [line.split(":")[0] for line in lines if "loss=" in line] == [
        "evaluation on training data", "evaluation on test data",
        "centralized evaluation on the pooled test set (40 examples)"]
    assert lines[-1].startswith("final: evaluation on training data accuracy ")
    assert ", evaluation on test data accuracy " in lines[-1]
    assert not any(AMBIGUOUS.search(line) for line in lines), lines
    # No targets unless the config sets them: nothing about rounds to a target, in the lines or the summary.
    assert not any("rounds to" in line or "not reached" in line for line in lines)
    assert "rounds_to_target" not in summary
    # summary.json: the same names as keys; metrics.jsonl keeps `train` and `eval` for older readers.
    assert summary["local_training"] == rows[-1]["train"]
    for split, key in (("train", "evaluation_on_training_data"), ("test", "evaluation_on_test_data"),
                       ("centralized", "centralized_evaluation")):
        assert summary[key] == rows[-1]["eval"][split]
    assert "train" not in summary and "eval" not in summary
    # TensorBoard: every learning curve has a point per round.
    logged = scalars(tmp_path / "run")
    for measured in MEASUREMENTS:
        assert [step for step, _ in logged[f"accuracy/{measured.key}"]] == [1, 2], measured.name


def test_targets_are_reported_only_when_set_and_never_in_1_rounds(tmp_path):
    lines, summary, _ = run_lines(tmp_path / "run", "rounds=1", "accuracy_targets=[0.999]")
    assert "rounds to test accuracy (evaluation on test data): 0.999 not reached in 1 round" in lines
    assert not any("1 rounds" in line for line in lines)
    assert summary["rounds_to_target"]["evaluation"] == "evaluation_on_test_data"
    assert summary["rounds_to_target"]["targets"] == {"0.999": None}
