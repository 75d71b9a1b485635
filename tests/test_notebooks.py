"""The notebooks, executed top to bottom in a real Jupyter kernel with fewer rounds."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

from fedmnist import config, logs, loop, plots
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


def our_workers() -> set[int]:
    """TFF worker processes started from this project's environment."""
    ours = str(Path(sys.prefix).resolve()).encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"worker_binary" in command and command.startswith(ours):
            pids.add(int(entry.name))
    return pids


@pytest.fixture
def no_leftover_workers():
    before = our_workers()
    yield
    assert not our_workers() - before, "a notebook left a TFF worker_binary process running"


@pytest.mark.usefixtures("no_leftover_workers")
def test_federated_mnist_notebook_trains_like_the_cli(tmp_path):
    run_dir = tmp_path / "notebook"
    notebook = execute("federated_mnist.ipynb", {"NUM_ROUNDS": 2, "DATASET": "digits", "RUN_DIR": str(run_dir)})

    rows = plots.read_metrics(run_dir)
    assert [row["round"] for row in rows] == [1, 2]
    text = printed(notebook)
    for row in rows:  # the article-style lines it printed are the metrics it saved
        assert logs.format_round(row["round"], row["train"]) in text
    summary = json.loads((run_dir / "summary.json").read_text())
    for split in ("train", "test"):
        assert logs.format_eval(split, summary["eval"][split]) in text
    assert (run_dir / plots.CURVES_FILE).read_bytes().startswith(b"\x89PNG")
    assert list(run_dir.glob("events.out.tfevents.*"))
    # The walk-through and the package's round loop are the same computation.
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    cli_config = config.load(overrides=["rounds=2", "data.dataset=digits", "eval_every=1", "histogram_every=0"])
    loop.train(cli_config, cli_dir, echo=lambda line: None, progress=False)
    for mine, theirs in zip(rows, plots.read_metrics(cli_dir), strict=True):
        assert mine["train"] == pytest.approx(theirs["train"], abs=1e-6)
        for split in ("train", "test"):
            assert mine["eval"][split] == pytest.approx(theirs["eval"][split], abs=1e-6)


@pytest.mark.usefixtures("no_leftover_workers")
def test_custom_model_notebook_matches_keras(tmp_path):
    notebook = execute("custom_model.ipynb", {"NUM_ROUNDS": 2, "DATASET": "digits", "RUN_DIR": str(tmp_path)})

    comparison = json.loads((tmp_path / "comparison.json").read_text())
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
        assert logs.format_round(round_num, metrics) in text


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebook_is_small_and_clean(name):
    path = NOTEBOOKS / name
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert path.stat().st_size < 100_000
    assert not MACHINE_PATH.search(path.read_text()), "a machine path in a committed notebook"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert not any(kind.startswith("image/") for kind in output.get("data", {})), "image output"
            assert output.get("name") != "stderr", "stderr output (warnings carry machine paths)"
