"""notebooks/privacy.ipynb runs end to end in a real kernel and shows the comparison table."""

import json
from pathlib import Path

import nbformat
import pytest

from nbrun import execute_notebook, machine_paths_in, outputs_text

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "privacy.ipynb"
MODES = ("plain", "secure", "dp", "compressed")


@pytest.fixture(scope="module")
def executed():
    return execute_notebook(NOTEBOOK, {"ROUNDS": 1})


def table_rows(notebook) -> dict[str, list[str]]:
    text = "".join(json.loads(t).get("text", "") for t in outputs_text(notebook))
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("aggregation"))
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:start + 1 + len(MODES)]}


def test_notebook_trains_all_four_modes_and_prints_the_table(executed):
    rows = table_rows(executed)
    assert list(rows) == list(MODES)
    for mode, (test_acc, train_acc, epsilon, upload, seconds) in rows.items():
        assert 0.0 <= float(test_acc) <= 1.0 and 0.0 <= float(train_acc) <= 1.0
        assert (epsilon != "-") == (mode == "dp")
        assert int(upload.replace(",", "")) > 0 and float(seconds) > 0
    uploads = {mode: int(row[3].replace(",", "")) for mode, row in rows.items()}
    assert uploads["compressed"] < uploads["plain"] < uploads["secure"]


def test_notebook_outputs_are_small_and_free_of_machine_paths(executed):
    assert machine_paths_in(executed) == []
    assert sum(len(t) for t in outputs_text(executed)) < 20_000
    assert not any(o.get("output_type") == "error" for c in executed.cells for o in c.get("outputs", []))


def test_committed_notebook_has_clean_outputs():
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert machine_paths_in(committed) == []
    assert any(c.get("metadata", {}).get("tags") == ["parameters"] for c in committed.cells)
