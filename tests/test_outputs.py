"""What a person looks at after a run (fedmnist.outputs): curves.png, `python -m fedmnist.report`, and
TensorBoard, served for real and read back through its HTTP data API."""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import os
import re

import matplotlib.image
import numpy as np
import portpicker
import pytest
from fedmnist import config
from fedmnist.outputs import plots, report
from fedmnist.outputs.records import ACCURACY
from helpers import (Background, children, metrics_rows, python_command, quiet_train, run_cli, run_command, scalars,
                     start_cli, tree_progress, wait_for, wait_gone, wait_process)

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


# --- model.keras ----------------------------------------------------------------------------------

def test_the_saved_model_loads_silently_and_evaluates(runs, tmp_path):
    code = ("import sys, numpy as np, tensorflow as tf\n"
            "model = tf.keras.models.load_model(sys.argv[1])\n"
            "loss, accuracy = model.evaluate(np.ones((4, 784), np.float32), np.zeros(4), verbose=0)\n"
            "print(model.predict(np.ones((2, 784), np.float32), verbose=0).shape, 0 <= accuracy <= 1)\n")
    done = run_command([sys.executable, "-c", code, str(runs["slow"] / "model.keras")], cwd=tmp_path,
                       env={"TF_CPP_MIN_LOG_LEVEL": "3"})  # TensorFlow's C++ start-up lines are not the file's
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10) True"
    assert done.stderr == ""  # no "Skipping variable loading for optimizer" warning


# --- TensorBoard's custom-scalars layout ----------------------------------------------------------

def layout_and_tags(run_dir: Path):
    """The run's last custom-scalars layout (the one TensorBoard shows), the steps at which layouts were
    written, and the run's scalar tags, read from its event files with TensorBoard's own reader."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    layouts = accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)
    last = layout_pb2.Layout.FromString(tf.make_ndarray(layouts[-1].tensor_proto).item()) if layouts else None
    return last, [event.step for event in layouts], set(scalars(run_dir))


def charts_of(layout, tag: str) -> list[str]:
    return [chart.title for category in layout.category for chart in category.chart
            if any(re.match(pattern, tag) for pattern in chart.multiline.tag)]


def test_the_run_writes_a_custom_scalars_layout_naming_its_tags(runs):
    from fedmnist.outputs.tensorboard import LEARNING_CURVES

    layout, steps, tags = layout_and_tags(runs["slow"])
    assert layout is not None and steps == [1]  # every tag arrives in round 1 (evaluated every round)
    assert {"loss/local_training", "accuracy/evaluation_on_test_data", "round/aggregation/upload_bytes_per_client",
            "round/participation/selected", "round/seconds"} <= tags
    assert {tag: len(charts_of(layout, tag)) for tag in tags} == {tag: 1 for tag in tags}  # each in one chart
    for category in layout.category:  # and no chart without a tag of the run
        for chart in category.chart:
            assert any(re.match(pattern, tag) for tag in tags for pattern in chart.multiline.tag), chart.title
    first, *below = layout.category
    assert first.title == LEARNING_CURVES and not first.closed and all(category.closed for category in below)
    assert {tag for tag in tags if charts_of(layout, tag) == ["accuracy per round"]} == {
        "accuracy/local_training", "accuracy/evaluation_on_training_data", "accuracy/evaluation_on_test_data"}
    assert [chart.title for chart in first.chart] == ["loss per round", "accuracy per round"]


@pytest.mark.unit
def test_the_layout_grows_with_new_tags_and_is_kept_across_a_resume(tmp_path):
    from fedmnist.outputs.tensorboard import TensorBoardLog, drop_events_after, scalar_tags

    board = TensorBoardLog(tmp_path)
    board.write(1, {"loss/local_training": 1.0})
    board.write(2, {"loss/local_training": 0.9})
    board.write(3, {"loss/local_training": 0.8, "loss/evaluation_on_test_data": 0.7, "round/seconds": 1.0})
    board.close()
    layout, steps, _ = layout_and_tags(tmp_path)
    assert steps == [1, 3] and charts_of(layout, "round/seconds") == ["round/seconds"]
    drop_events_after(tmp_path, 2)  # a resume after round 2: round 3's events go, its layout with them
    layout, steps, _ = layout_and_tags(tmp_path)
    assert steps == [1] and charts_of(layout, "round/seconds") == []
    board = TensorBoardLog(tmp_path, scalar_tags(tmp_path))
    board.write(3, {"loss/local_training": 0.8})  # nothing new: the layout kept still names every tag
    board.write(4, {"loss/local_training": 0.7, "round/seconds": 1.0})
    board.close()
    layout, steps, tags = layout_and_tags(tmp_path)
    assert steps == [1, 4] and tags == {"loss/local_training", "round/seconds"}
    assert [charts_of(layout, tag) for tag in sorted(tags)] == [["loss per round"], ["round/seconds"]]


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
    assert result.returncode == 0 and result.stderr == "", result.stderr
    lines = result.stdout.splitlines()
    # Two header lines: what is measured (one vocabulary), then the columns.
    assert re.split(r"\s{2,}", lines[0].strip()) == ["local training", "evaluation on training data",
                                                     "evaluation on test data"]
    assert lines[1].split() == ["run", "dataset", "model", "rounds", "loss", "accuracy", "accuracy", "accuracy",
                                "seconds"]
    for name, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        row = next(line.split() for line in lines if line.startswith(name + " "))
        assert row[1:4] == ["synthetic", "linear", str(ROUNDS)]
        assert row[4] == f"{summary['local_training']['loss']:.4f}"
        assert row[6] == f"{summary['evaluation_on_training_data']['sparse_categorical_accuracy']:.4f}"
        assert row[7] == f"{summary['evaluation_on_test_data']['sparse_categorical_accuracy']:.4f}"
        assert row[8] == f"{summary['total_seconds']:.1f}"
    # The two runs differ in one setting, which the report names with both values.
    settings = lines[lines.index("settings that differ (config.yaml):") + 1:]
    assert settings[0].split() == ["setting", "slow", "fast"]
    assert settings[2].split() == ["client_optimizer.learning_rate", "0.02", "0.1"]
    assert settings[3].startswith("accuracy curves: ")  # nothing else differs
    assert "rounds to reach" not in result.stdout  # no accuracy_targets in these runs' configs
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


def test_report_rejects_a_missing_run_dir_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_report(str(tmp_path / "nope"), capsys=capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such run directory"]
    assert not (tmp_path / "runs").exists()


BAD_RUNS = {"not_a_run": None, "corrupt": '{"round": 1, "tra\n{"round": 2, "train": {"loss": 1.0}}\n',
            "empty": "", "no_round": '{"train": {"loss": 1.0}}\n'}


def test_report_reads_a_run_whose_last_line_is_cut_as_resume_does(runs, tmp_path, capsys):
    """A run being written (or cut by a crash) ends in a partial line: its whole rounds are reported."""
    cut = tmp_path / "cut"
    shutil.copytree(runs["slow"], cut)
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    assert report.main([str(cut), "--output", str(tmp_path / "out.png")]) == 0
    assert capsys.readouterr().err == ""
    assert report.run_facts(cut)["rounds"] == len(lines) - 1


def make_bad_run(directory: Path, kind: str) -> Path:
    directory.mkdir()
    if BAD_RUNS[kind] is not None:
        (directory / "metrics.jsonl").write_text(BAD_RUNS[kind])
    return directory


@pytest.mark.parametrize("kind", list(BAD_RUNS))
def test_report_skips_a_bad_run_dir_with_a_note_and_reports_the_rest(runs, tmp_path, capsys, kind):
    bad = make_bad_run(tmp_path / "bad", kind)
    assert report.main([str(runs["slow"]), str(bad), "--output", str(tmp_path / "out.png")]) == 0
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(f"skipped {bad}: ")
    assert [line.split()[0] for line in captured.out.splitlines() if line.startswith(("slow", "bad"))] == ["slow"]
    assert (tmp_path / "out.png").stat().st_size > 0
    # Alone, it is an error: one line, exit 2, no plot.
    assert report.main([str(bad), "--output", str(tmp_path / "alone.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith(f"error: {bad}: ") and not (tmp_path / "alone.png").exists()


def test_report_on_a_glob_of_runs_reports_every_run_and_skips_the_rest(runs, tmp_path):
    # `fedmnist report runs/*/` where runs/ also holds an empty directory, a run that has not logged a round
    # and a directory of something else: as a user types it, through a shell glob.
    root = tmp_path / "runs"
    root.mkdir()
    for name in runs:
        os.symlink(runs[name], root / name)
    (root / "empty").mkdir()
    make_bad_run(root / "starting", "empty")
    (root / "photos").mkdir()
    (root / "photos" / "cat.png").write_bytes(b"\x89PNG")
    done = run_command(["sh", "-c", f"{' '.join(python_command('fedmnist', 'report'))} runs/*/ --output out.png"],
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stderr.splitlines()) == [
        "skipped runs/empty: not a fedmnist run (metrics.jsonl is missing)",
        "skipped runs/photos: not a fedmnist run (metrics.jsonl is missing)",
        "skipped runs/starting: metrics.jsonl holds no rounds yet"]
    reported = [line.split()[0] for line in done.stdout.splitlines() if line.startswith(("fast ", "slow "))]
    assert reported == ["fast", "slow"]
    assert (tmp_path / "out.png").stat().st_size > 0
    # Nothing but non-runs: exit 2 and one error line after the notes.
    done = run_command([*python_command("fedmnist", "report"), "runs/empty", "runs/photos"], cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1] == "error: none of the 2 directories is a fedmnist run with rounds"


def test_report_seconds_of_a_notebook_run_and_an_older_summary(runs, tmp_path):
    # A notebook's run: metrics.jsonl with no seconds per round (older notebooks wrote 0.0), and no
    # summary.json time: its time is unknown ("-"), not 0.0. A summary.json written before the keys
    # were renamed (train, eval) is read as before.
    notebook = tmp_path / "notebook"
    notebook.mkdir()
    rows = metrics_rows(runs["slow"])
    (notebook / "metrics.jsonl").write_text("".join(json.dumps({**row, "seconds": 0.0}) + "\n" for row in rows))
    old_summary = {"dataset": "synthetic", "model": "linear", "rounds": ROUNDS, "train": rows[-1]["train"],
                   "eval": rows[-1]["eval"]}
    (notebook / "summary.json").write_text(json.dumps(old_summary))
    facts = report.run_facts(notebook)
    assert facts["seconds"] is None and report.table_row("notebook", facts)[-1] == "-"
    assert facts["finished"] and facts["dataset"] == "synthetic"
    assert report.table_row("notebook", facts)[6:8] == report.table_row("slow", report.run_facts(runs["slow"]))[6:8]
    # With its rounds' seconds (the notebook records them now), their sum; with a total, the total.
    (notebook / "metrics.jsonl").write_text("".join(json.dumps({**row, "seconds": 0.5}) + "\n" for row in rows))
    assert report.run_facts(notebook)["seconds"] == pytest.approx(0.5 * ROUNDS)
    (notebook / "summary.json").write_text(json.dumps({**old_summary, "total_seconds": 12.25}))
    assert report.table_row("notebook", report.run_facts(notebook))[-1] == "12.2"


@pytest.mark.unit
def test_report_names_the_settings_that_differ(tmp_path):
    base = {"name": "tutorial", "rounds": 3, "accuracy_targets": [], "data": {"dataset": "digits", "num_clients": 20},
            "client_optimizer": {"learning_rate": 0.02}, "versions": {"fedmnist": "0.1.0"}}
    configs = {"a": base,
               "b": {**base, "client_optimizer": {"learning_rate": 0.1}, "accuracy_targets": [0.97]},
               "c": {**base, "data": {"dataset": "digits", "num_clients": 40}, "seed": 1}}
    differ = report.differing_settings(configs)
    assert differ == {"accuracy_targets": {"a": "[]", "b": "[0.97]", "c": "[]"},
                      "client_optimizer.learning_rate": {"a": "0.02", "b": "0.1", "c": "0.02"},
                      "data.num_clients": {"a": "20", "b": "20", "c": "40"},
                      "seed": {"a": "-", "b": "-", "c": "1"}}
    facts = {label: {"config": config} for label, config in configs.items()} | {"notebook": {"config": {}}}
    text = report.format_settings(facts)
    assert text.splitlines()[0] == "settings that differ (config.yaml):"
    assert text.splitlines()[-1] == "no config.yaml (settings not compared): notebook"
    same = report.format_settings({"a": {"config": base}, "b": {"config": dict(base)}})
    assert same == "settings: the same in every run's config.yaml"


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
        expected = {"loss/local_training", "accuracy/local_training", "loss/evaluation_on_training_data",
                    "accuracy/evaluation_on_training_data", "loss/evaluation_on_test_data",
                    "accuracy/evaluation_on_test_data", "round/learning_rate/client",
                    "round/learning_rate/server", "round/seconds"}
        for name, run_dir in runs.items():
            assert expected <= set(tags[name])
            rows = [record.to_json() for record in plots.read_records(run_dir)]
            for tag, path in (("loss/local_training", ("train", "loss")),
                              ("accuracy/evaluation_on_test_data", ("eval", "test", "sparse_categorical_accuracy"))):
                points = get_json(base, "data/plugin/scalars/scalars", run=name, tag=tag)
                assert [step for _, step, _ in points] == list(range(1, ROUNDS + 1))  # one value per round
                logged = [float(np.float32(_dig(row, path))) for row in rows]
                assert [value for _, _, value in points] == pytest.approx(logged, rel=1e-6)
            rates = get_json(base, "data/plugin/scalars/scalars", run=name, tag="round/learning_rate/client")
            assert [value for _, _, value in rates] == pytest.approx([0.02 if name == "slow" else 0.1] * ROUNDS)
        histograms = get_json(base, "data/plugin/histograms/tags")["slow"]
        assert {"weights/0_dense/kernel", "weights/0_dense/bias"} <= set(histograms)
        kernel = get_json(base, "data/plugin/histograms/histograms", run="slow", tag="weights/0_dense/kernel")
        assert [step for _, step, _ in kernel] == [2, 3]  # every 2 rounds, and the last
        text = get_json(base, "data/plugin/text/text", run="slow", tag="config")
        assert "client_optimizer:" in text[0]["text"] and "learning_rate: 0.02" in text[0]["text"]
        # The custom-scalars page: both runs' layouts merged into one, learning curves first (not twice).
        layout = get_json(base, "data/plugin/custom_scalars/layout")
        assert [c["title"] for c in layout["category"]][0] == "learning curves: local training and evaluation"
        curves = layout["category"][0]["chart"]
        assert [chart["multiline"]["tag"] for chart in curves] == [["^loss/"], ["^accuracy/"]]
        lines = get_json(base, "data/plugin/custom_scalars/scalars", run="slow",
                         tag=curves[1]["multiline"]["tag"][0])["tag_to_events"]
        assert sorted(lines) == ["accuracy/evaluation_on_test_data", "accuracy/evaluation_on_training_data",
                                 "accuracy/local_training"]
        assert [len(points) for points in lines.values()] == [ROUNDS] * 3  # curves, not dots
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
                        before_exec="import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)")
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
        assert wait_for(serving(process, lambda: get_json(url, "data/runs")), "TensorBoard listing the run",
                        progress=progress, ignore=HTTP_ERRORS) == ["run"]  # named after its directory, not "."
        points = wait_for(serving(process, lambda: (p := get_json(url, "data/plugin/scalars/scalars", run="run",
                                                                  tag="loss/local_training")) and len(p) == 2 and p),
                          "TensorBoard serving both rounds", progress=progress, ignore=HTTP_ERRORS)
        assert [step for _, step, _ in points] == [1, 2]
        assert f"learning curves, local training and evaluation together: {url}#custom_scalars" in "".join(seen)
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


@pytest.mark.unit
def test_weight_histograms_are_the_records_tf_summary_histogram_writes(tmp_path):
    # The package buckets histograms with TensorBoard's NumPy twin of tf.summary.histogram: the same record.
    import tensorflow as tf

    from fedmnist.outputs.tensorboard import TensorBoardLog

    rng = np.random.default_rng(0)
    arrays = {"weights/kernel": rng.standard_normal((784, 10)).astype(np.float32),
              "weights/bias": np.zeros(10, np.float32),  # one value: every bucket edge the same
              "weights/small": rng.uniform(-1, 1, 62).astype(np.float32)}
    board = TensorBoardLog(tmp_path / "package")
    board.write_histograms(3, arrays)
    board.close()
    writer = tf.summary.create_file_writer(str(tmp_path / "tf"))
    with writer.as_default():
        for tag, value in arrays.items():
            tf.summary.histogram(tag, value, step=3)
    writer.close()

    def records(directory):
        found = {}
        for path in directory.glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    found[value.tag] = (event.step, tf.make_ndarray(value.tensor).tolist(),
                                        value.metadata.plugin_data.plugin_name)
        return found

    package, reference = records(tmp_path / "package"), records(tmp_path / "tf")
    assert set(package) == set(arrays) and package == reference
