"""Re-executes the notebooks and keeps only small text outputs, as they are committed.

    uv run python notebooks/refresh.py [NOTEBOOK ...]    (default: every notebook here)

Images, stderr (TensorFlow's warnings carry machine paths), HTML/LaTeX duplicates and timing
metadata are dropped, so a committed notebook stays small and shows the printed results.
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
            text = output.get("data", {}).get("text/plain", "")
            if text and not text.startswith("<Figure size"):
                output.data = {"text/plain": text}
                output.metadata = {}
                kept.append(output)
    return kept


def refresh(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=1800, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
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
