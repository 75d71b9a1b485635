"""notebooks/privacy.ipynb runs end to end in a real kernel and shows the comparison table."""

import copy
import json
from pathlib import Path

import nbformat
import pytest

from helpers import Background
from nbrun import execute_notebook, machine_paths_in, outputs_text

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "privacy.ipynb"
MODES = ("plain", "secure", "dp", "secure_dp", "compressed")


# The kernel runs in the background from the start of the session (nbrun stops it, and checks that
# the TFF workers it started are gone with it).
BACKGROUND = {"executed": Background(lambda directory: execute_notebook(NOTEBOOK, {"ROUNDS": 1}), "privacy")}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    return BACKGROUND["executed"].result(tmp_path_factory)


def table_rows(notebook) -> dict[str, list[str]]:
    text = "".join(json.loads(t).get("text", "") for t in outputs_text(notebook))
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("aggregation"))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:start + 1 + len(MODES)]}


def test_notebook_trains_all_five_modes_and_prints_the_table(executed):
    rows = table_rows(executed)
    assert list(rows) == list(MODES)
    for mode, (test_acc, train_acc, epsilon, upload, seconds) in rows.items():
        assert 0.0 <= float(test_acc) <= 1.0 and 0.0 <= float(train_acc) <= 1.0
        assert (epsilon != "-") == (mode in ("dp", "secure_dp"))
        assert int(upload.replace(",", "")) > 0
        # dp's secret sample releases no round time (it would tell the sample's size): its cell says nan.
        assert float(seconds) > 0 if mode != "dp" else seconds == "-"
    uploads = {mode: int(row[3].replace(",", "")) for mode, row in rows.items()}
    assert uploads["compressed"] < uploads["plain"] < uploads["secure"]
    assert uploads["secure_dp"] < uploads["plain"]  # 16-bit coordinates, with the protocol's messages


def test_notebook_outputs_are_small_and_free_of_machine_paths(executed):
    assert machine_paths_in(executed) == []
    # Printed text stays short; a figure is a PNG of its own (the committed notebook keeps it).
    text_only = copy.deepcopy(executed)
    figures = [o["data"].pop("image/png") for c in text_only.cells for o in c.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert sum(len(t) for t in outputs_text(text_only)) < 20_000
    assert all(len(png) < 150_000 for png in figures)
    assert not any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))


@pytest.mark.unit
def test_committed_notebook_has_clean_outputs():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert machine_paths_in(committed) == []
    assert any(c.get("metadata", {}).get("tags") == ["parameters"] for c in committed.cells)
