"""Every command the README prints works as printed, here: each `bash` block's commands are listed below with
how this test runs them, and a command added to the README without a way to run it here fails the first test.

`python -m fedmnist.train` commands run in this process (`train.main`, the same arguments; the `uv run` in
front is what `.ci/run` itself runs); the others as subprocesses. Commands that would train long get a shorter
`--set rounds=...` appended, which the CLI applies last; offline, the EMNIST commands end in the one-line
"not cached" error, which is what they do on a machine without network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, run_command, start_cli, train_main, tree_progress, wait_for, wait_process

README = ROOT / "README.md"
RESUMED = "runs/tutorial-20261127-101500"


def readme_commands() -> list[str]:
    """The commands of the README's bash blocks, without their comments."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


TRAIN = "uv run python -m fedmnist.train"
HOW = {  # command -> how it is run here: "train" (with extra arguments), or a named recipe
    TRAIN: ("train", []),
    f"{TRAIN} --dataset digits --rounds 20 --clients-per-round 5": ("train", ["--set", "rounds=4"]),
    f"{TRAIN} --model cnn --set client_optimizer.learning_rate=0.05": ("train", ["--set", "rounds=2"]),
    f"{TRAIN} --config configs/fedprox.yaml": ("train", ["--set", "rounds=4"]),
    f"{TRAIN} --model mymodels:create_model": ("train", ["--set", "rounds=2"]),
    f"{TRAIN} --dataset emnist": ("offline", []),
    f"{TRAIN} --dataset emnist --set data.max_clients=100": ("offline", []),
    f"{TRAIN} --config configs/mcmahan2017/cnn-fedavg-e5-b10-iid.yaml": ("paper", ["--set", "rounds=1"]),
    f"{TRAIN} --tensorboard": ("tensorboard-run", ["--set", "rounds=2"]),
    f"{TRAIN} --resume {RESUMED}": ("resume", []),
    f"{TRAIN} --resume {RESUMED} --rounds 50": ("resume", []),
    "uv run tensorboard --logdir runs": ("tensorboard", []),
    "uv run python -m fedmnist.report runs/*/": ("report", []),
    "uv run --with jupyterlab jupyter lab notebooks/": ("jupyter", []),
    "uv run pytest": ("ci", []),
    "uv run pytest -m unit": ("unit", []),
}


def test_every_readme_command_has_a_way_to_run_here():
    assert set(readme_commands()) == set(HOW)


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A directory like a fresh clone's root: the configs, and the README's own model module."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (python_block,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (tmp_path / "mymodels.py").write_text(python_block)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # `python -m` puts the current directory on the path
    return tmp_path


def arguments(command: str) -> list[str]:
    return command.split()[len(TRAIN.split()):]


def finished_runs(root: Path) -> list[Path]:
    return [p.parent for p in (root / "runs").glob("*/summary.json")]


@pytest.mark.parametrize("command", [c for c, (how, _) in HOW.items() if how == "train"])
def test_training_commands(workspace, command):
    done = train_main(*arguments(command), *HOW[command][1], "--quiet")
    assert done.returncode == 0, done.stderr
    assert "final: " in done.stdout and len(finished_runs(workspace)) == 1


@pytest.mark.parametrize("command", [c for c, (how, _) in HOW.items() if how == "offline"])
def test_emnist_commands_say_in_one_line_what_to_do_offline(workspace, command, monkeypatch):
    monkeypatch.setenv("FEDMNIST_EMNIST_CACHE", str(workspace / "no-emnist-here"))
    done = train_main(*arguments(command), "--quiet")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1
    assert "federated EMNIST is not cached" in lines[0] and "cannot be downloaded" in lines[0]


def test_the_paper_command_on_a_stand_in_mnist(workspace, monkeypatch):
    from fedmnist.data import mnist

    mnist.write_npz(workspace / "mnist.npz", *mnist.digits_as_mnist())  # MNIST's format, scikit-learn's digits
    monkeypatch.setenv("FEDMNIST_MNIST_CACHE", str(workspace))
    command = f"{TRAIN} --config configs/mcmahan2017/cnn-fedavg-e5-b10-iid.yaml"
    done = train_main(*arguments(command), *HOW[command][1], "--quiet")
    assert done.returncode == 0, done.stderr
    (run_dir,) = finished_runs(workspace)
    from helpers import metrics_rows

    assert metrics_rows(run_dir)[-1]["eval"]["centralized"]["num_examples"] == 297  # the stand-in's test images
    # MNIST's test images are the server's own, not pooled from the clients' data.
    assert "centralized evaluation on the server's own test set (297 examples): " in done.stdout, done.stdout


def test_the_resume_commands_finish_then_extend_a_run(workspace):
    run_dir = workspace / RESUMED
    # Federated evaluation and histograms only at the end: the second command trains 47 more rounds.
    # A checkpoint after the last round only (every run saves one there), not after each of the 50.
    assert train_main("--dataset", "digits", "--rounds", "3", "--set", "eval_every=0", "--set", "histogram_every=0",
                      "--set", "checkpoint_every=50", "--run-dir", str(run_dir), "--quiet").returncode == 0
    (run_dir / "summary.json").unlink()  # the run's end was interrupted: the first command finishes it
    for command in (f"{TRAIN} --resume {RESUMED}", f"{TRAIN} --resume {RESUMED} --rounds 50"):
        done = train_main(*arguments(command), "--quiet")
        assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 50


def serve_until(command: list[str], cwd: Path, ready) -> str:
    """Starts a command that serves until interrupted, waits until `ready(output so far)` holds, then sends
    SIGINT (Ctrl-C), as a terminal does, and returns everything the command printed."""
    import threading

    process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in process.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: ready("".join(lines)) or process.poll() is not None, " ".join(command),
                 progress=tree_progress(process.pid), stall=300)
        assert process.poll() is None, "".join(lines)
        process.send_signal(signal.SIGINT)
        wait_process(process, " ".join(command))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=60)
    return "".join(lines)


def test_the_tensorboard_commands_serve(workspace):
    command = f"{TRAIN} --tensorboard"
    output = serve_until([sys.executable, "-m", "fedmnist.train", *arguments(command), *HOW[command][1], "--quiet"],
                         workspace, lambda printed: "TensorBoard is serving the run at http://127.0.0.1:" in printed)
    assert "run directory: runs/" in output and finished_runs(workspace)
    output = serve_until([sys.executable, "-m", "tensorboard.main", "--logdir", "runs"], workspace,
                         lambda printed: re.search(r"TensorBoard \S+ at http://", printed))
    assert "Press CTRL+C to quit" in output


def test_the_report_command_reports_every_run(workspace):
    for seed in ("1", "2"):
        assert train_main("--dataset", "digits", "--rounds", "2", "--seed", seed, "--quiet").returncode == 0
    done = run_command(["bash", "-c", "python -m fedmnist.report runs/*/"], cwd=workspace,
                       env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    for run_dir in finished_runs(workspace):
        assert run_dir.name in done.stdout


def test_the_unit_tier_command_selects_the_unit_tests():
    # Collected, not run again: the suite runs every one of them itself, and a second run cost a minute.
    done = run_command([sys.executable, "-m", "pytest", "-m", "unit", "--collect-only", "-q",
                        "-p", "no:cacheprovider"], cwd=ROOT, stall=300)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Traceback" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    selected = [line for line in done.stdout.splitlines() if "::" in line]
    assert re.search(rf"{len(selected)}/\d+ tests collected \(\d+ deselected\)", done.stdout), done.stdout[-500:]
    assert "tests/test_readme.py::test_the_unit_tier_command_selects_the_unit_tests" not in selected
    assert len(selected) > 100 and any(line.startswith("tests/test_config.py::") for line in selected)


def test_the_notebook_command_starts_jupyter_lab():
    import os

    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on this test's PATH (run the suite with `uv run pytest`)")
    # As printed, from the repository's root, plus what keeps a test's server to itself: no browser, a free
    # port on loopback.
    as_root = ["--allow-root"] if os.geteuid() == 0 else []  # CI runs as root, which Jupyter refuses unasked
    output = serve_until([uv, "run", "--with", "jupyterlab", "jupyter", "lab", "notebooks/", "--no-browser",
                          "--ServerApp.port=0", "--ServerApp.ip=127.0.0.1", *as_root], ROOT,
                         lambda printed: "is running at:" in printed and "http://127.0.0.1:" in printed)
    assert "http://127.0.0.1:" in output


# `uv run pytest` is what CI runs (.ci/run): the whole suite, this file included.
