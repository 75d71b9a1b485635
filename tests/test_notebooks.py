"""The notebooks, executed top to bottom in a real Jupyter kernel with fewer rounds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from fedmnist import config
from fedmnist.outputs import plots
from fedmnist.outputs.console import format_eval, format_round
from fedmnist.outputs.records import measurement
from helpers import Background, quiet_train
from nbrun import execute_notebook

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_NAMES = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|root|tmp|usr|opt|var|Users)/")


def execute(name: str, parameters: dict) -> nbformat.NotebookNode:
    """Runs a notebook in a fresh kernel from the notebooks directory, as Jupyter would."""
    return execute_notebook(NOTEBOOKS / name, parameters, cwd=NOTEBOOKS)


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")


def federated_mnist(directory: Path) -> tuple[Path, nbformat.NotebookNode]:
    run_dir = directory / "notebook"
    return run_dir, execute("federated_mnist.ipynb", {"NUM_ROUNDS": 2, "DATASET": "digits", "RUN_DIR": str(run_dir)})


def custom_model(directory: Path) -> tuple[Path, nbformat.NotebookNode]:
    return directory, execute("custom_model.ipynb", {"NUM_ROUNDS": 2, "DATASET": "digits", "RUN_DIR": str(directory)})


# The kernels run in the background from the start of the session (nbrun stops each one, and checks
# that the TFF workers it started are gone with it).
BACKGROUND = {"federated_mnist_run": Background(federated_mnist), "custom_model_run": Background(custom_model)}


@pytest.fixture
def federated_mnist_run(tmp_path_factory):
    return BACKGROUND["federated_mnist_run"].result(tmp_path_factory)


@pytest.fixture
def custom_model_run(tmp_path_factory):
    return BACKGROUND["custom_model_run"].result(tmp_path_factory)


def test_federated_mnist_notebook_trains_like_the_cli(federated_mnist_run, tmp_path):
    run_dir, notebook = federated_mnist_run
    records = plots.read_records(run_dir)
    assert [record.round for record in records] == [1, 2]
    text = printed(notebook)
    for record in records:  # the article-style lines it printed are the metrics it saved
        assert format_round(record.round, record.train) in text
    summary = json.loads((run_dir / "summary.json").read_text())
    for split in ("train", "test"):
        assert format_eval(split, summary[measurement(split).key]) in text
    assert (run_dir / plots.CURVES_FILE).read_bytes().startswith(b"\x89PNG")
    assert list(run_dir.glob("events.out.tfevents.*"))
    # The walk-through and the package's round loop are the same computation.
    cli_dir = tmp_path / "cli"
    cli_config = config.load(overrides=["rounds=2", "data.dataset=digits", "eval_every=1", "histogram_every=0",
                                        "preprocess.shuffle=fixed"])  # the article's datasets, reused every round
    quiet_train(cli_config, cli_dir)
    for mine, theirs in zip(records, plots.read_records(cli_dir), strict=True):
        assert mine.train == pytest.approx(theirs.train, abs=1e-6)
        for split in ("train", "test"):
            assert mine.eval[split] == pytest.approx(theirs.eval[split], abs=1e-6)


def test_custom_model_notebook_matches_keras(custom_model_run):
    run_dir, notebook = custom_model_run
    comparison = json.loads((run_dir / "comparison.json").read_text())
    custom, keras = comparison["train"]["MnistModel"], comparison["train"]["Keras"]
    assert len(custom) == len(keras) == 2
    assert custom[1]["loss"] < custom[0]["loss"]  # it learns
    for mine, theirs in zip(custom, keras):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert mine["accuracy"] == pytest.approx(theirs["sparse_categorical_accuracy"], abs=1e-5)
    assert max(comparison["max_difference"].values()) < 1e-4
    evaluated = comparison["eval_test"]
    assert evaluated["MnistModel"]["accuracy"] == pytest.approx(
        evaluated["Keras"]["sparse_categorical_accuracy"], abs=1e-5)
    text = printed(notebook)
    for round_num, metrics in enumerate(custom, start=1):
        assert format_round(round_num, metrics) in text


@pytest.mark.unit
@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebook_is_small_and_clean(name):
    """As notebooks/refresh.py commits them: printed output, results as text and figures as small PNGs;
    no stderr (TensorFlow's warnings carry machine paths), no HTML duplicates, no timing metadata."""
    path = NOTEBOOKS / name
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert path.stat().st_size < 400_000
    assert not MACHINE_PATH.search(path.read_text()), "a machine path in a committed notebook"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in notebook.cells:
        assert "execution" not in cell.metadata, "timing metadata"
        for output in cell.get("outputs", []):
            assert output.get("name") != "stderr", "stderr output (warnings carry machine paths)"
            data = output.get("data", {})
            assert set(data) <= {"text/plain", "image/png"}, f"an output other than text or PNG: {sorted(data)}"
            assert len(data.get("image/png", "")) < 150_000, "a figure too large to commit"
