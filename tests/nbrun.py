"""Executing the project's notebooks from tests, with a real Jupyter kernel.

`execute_notebook(path, parameters)` runs a notebook top to bottom in an IPython kernel started from
this interpreter (so it sees the same installed packages), after injecting `parameters` in a cell
placed right after the cell tagged `parameters`, as papermill does. Execution errors raise
`nbclient.exceptions.CellExecutionError` with the failing cell's traceback. The kernel is shut down
before it returns or raises, and it is checked to be gone.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

KERNEL_NAME = "fedmnist-tests"


def inject_parameters(notebook: nbformat.NotebookNode, parameters: Mapping[str, object]) -> None:
    """Adds `NAME = value` assignments after the cell tagged `parameters` (or at the top)."""
    if not parameters:
        return
    source = "# Parameters injected by the tests\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    notebook.cells.insert(tagged[0] + 1 if tagged else 0, cell)


def _kernel_manager(kernel_dir: Path) -> KernelManager:
    """A kernel running this very interpreter, whatever kernelspecs the machine has installed."""
    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "fedmnist tests", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute_notebook(path: str | Path, parameters: Mapping[str, object] | None = None,
                     timeout: int = 1800, cwd: str | Path | None = None) -> nbformat.NotebookNode:
    """The notebook at `path`, executed (it is not written back).

    The kernel is shut down afterwards, and every TFF worker it started must be gone with it.
    `timeout` bounds one cell; it only guards against a hang (a loaded machine runs cells slowly).
    """
    from helpers import child_env, children, wait_gone

    notebook = nbformat.read(path, as_version=4)
    inject_parameters(notebook, parameters or {})
    kernels: set[int] = set()
    workers: set[int] = set()

    def note_kernel(**_) -> None:
        kernels.add(kernel.provisioner.process.pid)

    def note_workers(**_) -> None:  # after each cell: the workers the kernel runs
        workers.update(pid for pid in kernels for pid in children(pid, b"worker_binary"))

    with tempfile.TemporaryDirectory() as kernel_dir:
        kernel = _kernel_manager(Path(kernel_dir))
        client = NotebookClient(notebook, timeout=timeout, km=kernel, shutdown_kernel="graceful",
                                on_notebook_start=note_kernel, on_cell_executed=note_workers,
                                resources={"metadata": {"path": str(cwd or Path(path).parent)}})
        try:
            # cleanup_kc: shut the kernel down afterwards, although this module made its manager
            # (nbclient would otherwise leave it running until the interpreter exits).
            client.execute(cleanup_kc=True, env=child_env())  # notebooks run as background work
        finally:
            if kernel.has_kernel:  # it failed before nbclient took charge of the kernel
                kernels.add(kernel.provisioner.process.pid)
                kernel.shutdown_kernel(now=True)
            wait_gone(kernels, "the notebook's kernel after its shutdown")
    wait_gone(workers, "a TFF worker_binary the notebook started, after its kernel ended")
    # Collect the kernel's clients now: left to interpreter exit, their finalizers log a
    # "could not destroy zmq context" stack trace.
    del client
    gc.collect()
    return notebook


def outputs_text(notebook: nbformat.NotebookNode) -> Iterator[str]:
    """The text of every output (streams, results, errors; images as their base64 text)."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            yield json.dumps(output)


def machine_paths_in(notebook: nbformat.NotebookNode) -> list[str]:
    """Absolute paths of this machine that appear in the outputs (home, working and temporary
    directories, the interpreter's prefix)."""
    roots = {str(Path.home()), os.getcwd(), tempfile.gettempdir(), sys.prefix, str(Path(__file__).resolve().parents[1])}
    found = []
    for text in outputs_text(notebook):
        found += [root for root in roots if root and root != "/" and root in text]
        found += re.findall(r"(?:/tmp/|/home/|/root/)[\w./-]+", text)
    return sorted(set(found))
