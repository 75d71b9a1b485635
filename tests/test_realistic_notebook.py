"""notebooks/realistic_clients.ipynb runs in a real kernel and prints its comparison table."""

import json
from pathlib import Path

import pytest

from helpers import Background
from nbrun import execute_notebook, machine_paths_in, outputs_text

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "realistic_clients.ipynb"
RUNS = ["iid", "dirichlet", "shards", "dirichlet, realistic availability", "dirichlet, FedAdam", "dirichlet, FedProx"]


# The kernel runs in the background from the start of the session (nbrun stops it, and checks that
# the TFF workers it started are gone with it).
BACKGROUND = {"executed": Background(
    lambda directory: execute_notebook(NOTEBOOK, {"ROUNDS": 2, "NUM_CLIENTS": 20}, cwd=NOTEBOOK.parent),
    "realistic_clients")}


@pytest.fixture
def executed(tmp_path_factory):
    return BACKGROUND["executed"].result(tmp_path_factory)


def test_realistic_clients_notebook_compares_the_runs(executed):
    notebook = executed
    text = "".join(json.loads(t).get("text", "") for t in outputs_text(notebook))
    skews = {line.split()[0]: float(line.split()[2].rstrip(",")) for line in text.splitlines()
             if line.split() and line.split()[0] in ("iid", "dirichlet", "shards") and "skew" in line}
    assert skews["iid"] < skews["dirichlet"] and skews["iid"] < skews["shards"]
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("run ") and "final accuracy" in line)
    table = lines[header + 1:header + 1 + len(RUNS)]
    assert [line[:36].strip() for line in table] == RUNS
    for line in table:
        final, best, trained, dropped = line[36:].split()
        assert 0.0 <= float(final) <= float(best) <= 1.0 and 0 <= int(trained) <= 2 and int(dropped) >= 0
    assert "round  clock  available" in text
    assert machine_paths_in(notebook) == []
