"""What a person looks at after a run (fedmnist.outputs): curves.png, `python -m fedmnist.report`, and
TensorBoard, served for real and read back through its HTTP data API."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib.image
import numpy as np
import portpicker
import pytest

from fedmnist import config
from fedmnist.outputs import plots, report
from fedmnist.outputs.records import ACCURACY
from helpers import (Background, children, metrics_rows, quiet_train, run_cli, start_cli, tree_progress, wait_for, wait_gone,
                     wait_process)

ROUNDS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs on the synthetic data that differ in their client learning rate."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, learning_rate in (("slow", 0.02), ("fast", 0.1)):
        cfg = config.load(overrides=[f"rounds={ROUNDS}", "data.dataset=synthetic", "data.num_clients=6",
                                     "clients_per_round=3", "eval_every=1", "histogram_every=2",
                                     f"client_optimizer.learning_rate={learning_rate}"])
        quiet_train(cfg, root / name)
        made[name] = root / name
    return made


# --- curves.png -----------------------------------------------------------------------------------

def test_every_run_writes_a_readable_curves_png(runs):
    image = matplotlib.image.imread(runs["slow"] / plots.CURVES_FILE)
    height, width = image.shape[:2]
    assert (width, height) == (1000, 400)
    # Not blank: the curves put coloured pixels (blue train, orange/green eval) on the white figure.
    colourful = np.ptp(image[..., :3], axis=2) > 0.3
    assert colourful.mean() > 0.002


def test_curve_series_are_the_logged_metrics(runs):
    records = plots.read_records(runs["slow"])
    rows = [json.loads(line) for line in (runs["slow"] / "metrics.jsonl").read_text().splitlines()]
    assert [record.to_json() for record in records] == rows  # a record is its metrics.jsonl line
    rounds, accuracy = plots.series(records, ("eval", "test"), ACCURACY)
    assert rounds == list(range(1, ROUNDS + 1))
    assert accuracy == [row["eval"]["test"]["sparse_categorical_accuracy"] for row in rows]
    rounds, loss = plots.series(records, ("train",), "loss")
    assert loss == [row["train"]["loss"] for row in rows]


# --- python -m fedmnist.report --------------------------------------------------------------------

def run_report(*args: str, capsys) -> tuple[int, str, str]:
    """`python -m fedmnist.report ARGS` in this process: exit code, stdout, stderr."""
    code = report.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_tables_final_metrics_and_overlays_curves(runs, tmp_path):
    # The documented command, as a user runs it.
    output = tmp_path / "compare.png"
    result = run_cli(str(runs["slow"]), str(runs["fast"]), "--output", str(output), module="fedmnist.report",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "dataset", "model"]
    for name, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        row = next(line.split() for line in lines if line.startswith(name + " "))
        assert row[1:4] == ["synthetic", "linear", str(ROUNDS)]
        assert row[6] == f"{summary['eval']['train']['sparse_categorical_accuracy']:.4f}"
        assert row[7] == f"{summary['eval']['test']['sparse_categorical_accuracy']:.4f}"
    image = matplotlib.image.imread(output)
    assert image.shape[:2] == (450, 1100)
    # Both runs' colours (matplotlib's C0 blue and C1 orange) are on the plot.
    for colour in ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05)):
        assert (np.abs(image[..., :3] - colour).max(axis=2) < 0.05).sum() > 50


def test_report_default_output_goes_to_runs_and_never_overwrites(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_report(str(runs["slow"]), capsys=capsys)
    assert code == 0, err
    written = sorted((tmp_path / "runs").glob("report-*.png"))
    assert len(written) == 1 and written[0].name in out
    before = written[0].read_bytes()
    code, out, err = run_report(str(runs["fast"]), "--output", str(written[0]), capsys=capsys)
    assert code == 2 and "--overwrite" in err
    assert out == "" and written[0].read_bytes() == before
    code, _, err = run_report(str(runs["fast"]), "--output", str(written[0]), "--overwrite", capsys=capsys)
    assert code == 0 and written[0].read_bytes() != before, err


def test_report_reads_an_unfinished_run(runs, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    rows = (runs["slow"] / "metrics.jsonl").read_text().splitlines()[:2]
    (partial / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    (partial / "config.yaml").write_text((runs["slow"] / "config.yaml").read_text())
    facts = report.run_facts(partial)
    assert not facts["finished"] and facts["rounds"] == 2
    assert report.table_row("partial", facts)[3] == f"2/{ROUNDS}"


def test_report_rejects_a_missing_run_dir_with_one_line_and_exit_2(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_report(str(runs["slow"]), str(tmp_path / "nope"), capsys=capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such run directory"]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("make_bad", ["not_a_run", "corrupt", "empty", "no_round"])
def test_report_rejects_a_bad_run_dir(runs, tmp_path, capsys, make_bad):
    bad = tmp_path / "bad"
    bad.mkdir()
    contents = {"corrupt": '{"round": 1, "train": {"loss": 1.0}}\n{"round": 2, "tra\n', "empty": "",
                "no_round": '{"train": {"loss": 1.0}}\n'}
    if make_bad in contents:
        (bad / "metrics.jsonl").write_text(contents[make_bad])
    assert report.main([str(runs["slow"]), str(bad), "--output", str(tmp_path / "out.png")]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and str(bad) in captured.err
    assert captured.out == "" and not (tmp_path / "out.png").exists()


# --- TensorBoard, served for real ----------------------------------------------------------------

HTTP_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError)


def get_json(base: str, path: str, **query: str):
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=60) as response:  # a guard against a hang, not a budget
        return json.loads(response.read())


def serving(process: subprocess.Popen, condition):
    """`condition` for `wait_for`, failing at once when the server process has exited."""
    def check():
        if process.poll() is not None:
            raise AssertionError(f"process exited early with code {process.returncode}")
        return condition()

    return check


def test_tensorboard_serves_the_runs_scalars_histograms_and_config(runs):
    port = portpicker.pick_unused_port()
    base = f"http://127.0.0.1:{port}/"
    logdir = runs["slow"].parent
    server = subprocess.Popen(  # the README's one-liner: tensorboard --logdir runs
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir),
         "--host", "127.0.0.1", "--port", str(port)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def fully_loaded() -> bool:  # each run's last events are round ROUNDS's weight histograms
            return all(len(get_json(base, "data/plugin/histograms/histograms", run=name,
                                    tag="weights/0_dense/kernel")) == 2 for name in runs)

        wait_for(serving(server, fully_loaded), "TensorBoard loading both runs", progress=tree_progress(server.pid),
                 ignore=HTTP_ERRORS)
        tags = get_json(base, "data/plugin/scalars/tags")
        assert sorted(get_json(base, "data/runs")) == ["fast", "slow"]
        expected = {"train/loss", "train/sparse_categorical_accuracy", "eval/train/loss",
                    "eval/train/sparse_categorical_accuracy", "eval/test/loss",
                    "eval/test/sparse_categorical_accuracy", "learning_rate/client",
                    "learning_rate/server", "time/round_seconds"}
        for name, run_dir in runs.items():
            assert expected <= set(tags[name])
            rows = [record.to_json() for record in plots.read_records(run_dir)]
            for tag, path in (("train/loss", ("train", "loss")),
                              ("eval/test/sparse_categorical_accuracy", ("eval", "test", "sparse_categorical_accuracy"))):
                points = get_json(base, "data/plugin/scalars/scalars", run=name, tag=tag)
                assert [step for _, step, _ in points] == list(range(1, ROUNDS + 1))  # one value per round
                logged = [float(np.float32(_dig(row, path))) for row in rows]
                assert [value for _, _, value in points] == pytest.approx(logged, rel=1e-6)
            rates = get_json(base, "data/plugin/scalars/scalars", run=name, tag="learning_rate/client")
            assert [value for _, _, value in rates] == pytest.approx([0.02 if name == "slow" else 0.1] * ROUNDS)
        histograms = get_json(base, "data/plugin/histograms/tags")["slow"]
        assert {"weights/0_dense/kernel", "weights/0_dense/bias"} <= set(histograms)
        kernel = get_json(base, "data/plugin/histograms/histograms", run="slow", tag="weights/0_dense/kernel")
        assert [step for _, step, _ in kernel] == [2, 3]  # every 2 rounds, and the last
        text = get_json(base, "data/plugin/text/text", run="slow", tag="config")
        assert "client_optimizer:" in text[0]["text"] and "learning_rate: 0.02" in text[0]["text"]
    finally:
        server.kill()
        server.wait()


def _dig(row: dict, path: tuple[str, ...]):
    for key in path:
        row = row[key]
    return row


def train_with_tensorboard(directory: Path) -> Path:
    """`python -m fedmnist.train --tensorboard`: serves the run while it trains and after, until Ctrl-C,
    which stops TensorBoard with it. Checks all that (in the background); returns the run directory."""
    run_dir = directory / "run"
    # Restore SIGINT's default in the child, in case this test runs under a shell that ignores it.
    process = start_cli("--dataset", "synthetic", "--rounds", "2", "--set", "data.num_clients=4",
                        "--clients-per-round", "2", "--run-dir", str(run_dir), "--quiet", "--tensorboard",
                        cwd=directory, stderr=subprocess.STDOUT,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    seen: list[str] = []
    progress = tree_progress(process.pid)

    def line_with(text: str) -> str:
        def next_line():
            while not lines.empty():
                seen.append(lines.get())
                if text in seen[-1]:
                    return seen[-1]
            assert process.poll() is None, "the command exited; it printed:\n" + "".join(seen)
            return None

        return wait_for(next_line, f"a line with {text!r}", progress=progress)

    server_pids: list[int] = []
    try:
        url = line_with("TensorBoard: ").split("TensorBoard: ")[1].strip()
        assert url.startswith("http://127.0.0.1:")
        line_with("press Ctrl-C to stop it")
        server_pids = children(process.pid, b"tensorboard")
        assert server_pids
        points = wait_for(serving(process, lambda: (p := get_json(url, "data/plugin/scalars/scalars", run=".",
                                                                  tag="train/loss")) and len(p) == 2 and p),
                          "TensorBoard serving both rounds", progress=progress, ignore=HTTP_ERRORS)
        assert [step for _, step, _ in points] == [1, 2]
        process.send_signal(signal.SIGINT)
        assert wait_process(process, "the command after Ctrl-C") == 0, "".join(seen)
        wait_gone(server_pids, "TensorBoard after the command stopped")  # stopped with it
    finally:
        if process.poll() is None:
            process.kill()  # its children die with it (PR_SET_PDEATHSIG)
            process.wait()
        wait_gone(server_pids, "TensorBoard after the command was killed")
    return run_dir


BACKGROUND = {"tensorboard_run": Background(train_with_tensorboard)}


@pytest.fixture
def tensorboard_run(tmp_path_factory) -> Path:
    return BACKGROUND["tensorboard_run"].result(tmp_path_factory)


def test_train_with_tensorboard_serves_the_run_until_ctrl_c(tensorboard_run):
    assert (tensorboard_run / plots.CURVES_FILE).exists()
    assert [row["round"] for row in metrics_rows(tensorboard_run)] == [1, 2]
