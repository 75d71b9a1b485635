"""Re-executes the notebooks and keeps what a reader needs, as they are committed.

    uv run python notebooks/refresh.py [NOTEBOOK ...]    (default: every notebook here)

Kept: printed output and results as text, and figures as PNG (at a resolution that keeps each a few
tens of KB). Dropped: stderr (TensorFlow's warnings carry machine paths), HTML/LaTeX duplicates of
results and timing metadata, so a committed notebook stays small, path-free and shows its figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent


def small_text_outputs(outputs: list) -> list:
    kept = []
    for output in outputs:
        if output.output_type == "stream":
            if output.name != "stdout":
                continue
            if kept and kept[-1].output_type == "stream":
                kept[-1].text += output.text
            else:
                kept.append(output)
        elif output.output_type in ("execute_result", "display_data"):
            data = output.get("data", {})
            text = data.get("text/plain", "")
            if "image/png" in data:
                output.data = {"image/png": data["image/png"], "text/plain": text}
                output.metadata = {}
                kept.append(output)
            elif text and not text.startswith("<Figure size"):
                output.data = {"text/plain": text}
                output.metadata = {}
                kept.append(output)
    return kept


# Figures inline at 72 dpi, PNG only: small enough to commit, sharp enough to read.
SETUP = "%matplotlib inline\n%config InlineBackend.figure_formats = ['png']\n%config InlineBackend.rc = {'figure.dpi': 72}"


def refresh(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(SETUP))
    NotebookClient(notebook, timeout=1800, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    notebook.cells.pop(0)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = small_text_outputs(cell.outputs)
            cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def main(argv: list[str]) -> int:
    for path in [Path(arg) for arg in argv] or sorted(HERE.glob("*.ipynb")):
        print(f"executing {path.name}", flush=True)
        refresh(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
