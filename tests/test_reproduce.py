"""`fedmnist reproduce mcmahan2017`: a grid of normal runs, resumed not retrained, then table.md and
curves.png (fedmnist/reproduce.py, fedmnist/paper/). MNIST is a small random file in Keras's exact
`mnist.npz` layout, and the rows' configs are tiny stand-ins with the real rows' names."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from fedmnist import reproduce
from fedmnist.outputs.records import RoundRecord
from fedmnist.paper import mcmahan2017, table
from helpers import ROOT, Done, kept_signal_handlers, metrics_rows, train_main
from test_mcmahan2017 import write_fake_mnist

ROW = "2nn-fedavg-e1-b10-iid"


def tiny_config(name: str) -> dict:
    """The real row's config, shrunk: 4 clients, 2 a round, 2 rounds, centralized evaluation every round."""
    values = yaml.safe_load((ROOT / "configs" / "mcmahan2017" / f"{name}.yaml").read_text())
    values.update(rounds=2, clients_per_round=2, checkpoint_every=1, model="2nn")
    values["data"].update(num_clients=4, allow_download=False)
    return values


def reproduce_main(*args: str) -> Done:
    out, err = io.StringIO(), io.StringIO()
    with kept_signal_handlers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = reproduce.main(list(args))
    return Done(["fedmnist.reproduce", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    """One row over two learning rates, trained once for the module's tests."""
    root = tmp_path_factory.mktemp("reproduce")
    write_fake_mnist(root / "data", train=120, test=40)
    configs = root / "configs"
    configs.mkdir()
    (configs / f"{ROW}.yaml").write_text(yaml.safe_dump(tiny_config(ROW)))
    common = ["mcmahan2017", "--rows", ROW, "--lrs", "0.05,0.1", "--seeds", "0", "--out", str(root / "runs"),
              "--configs", str(configs), "--set", f"data.cache_dir={root / 'data'}"]
    first = reproduce_main(*common)
    return {"root": root, "common": common, "first": first, "out": root / "runs"}


def test_the_grid_makes_one_normal_run_directory_per_rate_and_seed(grid):
    assert grid["first"].returncode == 0, grid["first"].stderr
    out = grid["out"]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == [f"{ROW}-lr0.05-seed0", f"{ROW}-lr0.1-seed0"]
    for name, lr in ((runs[0], 0.05), (runs[1], 0.1)):
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert config["client_optimizer"]["learning_rate"] == lr and config["seed"] == 0
        assert [row["round"] for row in metrics_rows(out / name)] == [1, 2]
        assert (out / name / "summary.json").is_file()
        assert list((out / name).rglob("events.out.tfevents.*"))  # TensorBoard reads the run
    text = (out / "table.md").read_text()
    assert f"{ROW}-lr0.05-seed0" in text and f"{ROW}-lr0.1-seed0" in text
    assert (out / "curves.png").stat().st_size > 1000


def test_a_second_invocation_skips_finished_runs_and_resumes_unfinished_ones(grid):
    out = grid["out"]
    finished, unfinished = out / f"{ROW}-lr0.05-seed0", out / f"{ROW}-lr0.1-seed0"
    before = (finished / "metrics.jsonl").stat().st_mtime_ns
    first_round = (unfinished / "metrics.jsonl").read_text().splitlines()[0]
    (unfinished / "summary.json").unlink()  # as if killed before its end: 2 rounds done, no summary
    again = reproduce_main(*grid["common"], "--rounds", "3")
    assert again.returncode == 0, again.stderr
    assert f"done already: {finished}" in again.stdout
    assert f"resuming: {unfinished}" in again.stdout and "resuming after round 2" in again.stdout
    assert (finished / "metrics.jsonl").stat().st_mtime_ns == before  # not touched
    assert [row["round"] for row in metrics_rows(unfinished)] == [1, 2, 3]  # rounds not duplicated
    assert (unfinished / "metrics.jsonl").read_text().splitlines()[0] == first_round
    assert (unfinished / "summary.json").is_file()


def test_table_only_rebuilds_table_and_figure_without_training(grid):
    out = grid["out"]
    (out / "table.md").unlink()
    (out / "curves.png").unlink()
    stamps = {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    done = reproduce_main("mcmahan2017", "--rows", ROW, "--out", str(out), "--table-only")
    assert done.returncode == 0, done.stderr
    assert (out / "table.md").is_file() and (out / "curves.png").is_file()
    assert "training" not in done.stdout and "resuming" not in done.stdout
    assert stamps == {p: (p / "metrics.jsonl").stat().st_mtime_ns for p in stamps}


def test_export_keeps_each_runs_records_and_rebuilds_the_same_table_from_them(grid):
    out, exported = grid["out"], grid["root"] / "kept"
    done = reproduce_main("mcmahan2017", "--rows", ROW, "--out", str(out), "--table-only", "--export", str(exported))
    assert done.returncode == 0, done.stderr
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert sorted(p.name for p in exported.iterdir() if p.is_dir()) == runs
    for name in runs:  # the records only: no checkpoints, no event files
        assert sorted(p.name for p in (exported / name).iterdir()) == sorted(table.RECORD_FILES)
        assert (exported / name / "metrics.jsonl").read_bytes() == (out / name / "metrics.jsonl").read_bytes()
        finished = json.loads((out / name / "summary.json").read_text())["finished_at"]
        assert datetime.datetime.fromisoformat(finished).tzinfo is not None
    # Rebuilt from the copies alone, whose file times say nothing (as in a fresh checkout): the same table.
    for path in exported.rglob("*"):
        os.utime(path, (0, 0))
    rebuilt = reproduce_main("mcmahan2017", "--rows", ROW, "--out", str(exported), "--table-only")
    assert rebuilt.returncode == 0, rebuilt.stderr

    def rows_of(folder):
        return [line for line in (folder / "table.md").read_text().splitlines() if line.startswith(f"| {ROW}")]

    assert rows_of(exported) == rows_of(out) and len(rows_of(out)) == 1 + len(runs)
    assert all(finished[:10] in line for line in rows_of(exported))
    refused = reproduce_main("mcmahan2017", "--out", str(out), "--table-only", "--export", str(out))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "--export" in refused.stderr


def test_stop_after_target_ends_the_run_with_rounds_to_target_exact(tmp_path):
    write_fake_mnist(tmp_path / "data", train=120, test=40)
    config = tiny_config(ROW) | {"rounds": 4, "accuracy_targets": [0.01], "stop_after_target": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = train_main("--config", str(tmp_path / "c.yaml"), "--set", f"data.cache_dir={tmp_path / 'data'}",
                      "--run-dir", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 0, done.stderr
    assert [row["round"] for row in metrics_rows(tmp_path / "run")] == [1, 2]  # target at round 1, then 1 more
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_after_target"] == {"round": 2, "rounds_after": 1}
    assert summary["rounds_to_target"]["targets"] == {"0.01": 1.0}


# --- Bad input: one line, exit 2 ----------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["mcmahan2017", "--rows", "cnn-fedavg-e7-iid"], "--rows: unknown row 'cnn-fedavg-e7-iid'"),
    (["mcmahan2017", "--lrs", "0.1,fast"], "--lrs 0.1,fast: 'fast' is not a number"),
    (["mcmahan2017", "--lrs", "0.1,-2"], "out of range"),
    (["mcmahan2017", "--seeds", "a"], "--seeds a: 'a' is not a whole number"),
    (["mcmahan2016"], "unknown paper 'mcmahan2016'"),
    (["mcmahan2017", "--rounds", "0"], "--rounds 0: must be at least 1"),
    (["mcmahan2017", "--lr", "0.1"], "did you mean --lrs?"),
    (["mcmahan2017", "--lrs", "best"], "--lrs best: row cnn-fedsgd-iid has no runs"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    done = reproduce_main(*args, "--out", str(tmp_path / "runs"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


# --- The table's logic, on hand-written runs ----------------------------------------------------------

def fake_run(out: Path, row: str, lr: float, seed: int, accuracies: list[float], finished: bool = True,
             planned: int = 50) -> Path:
    run_dir = out / reproduce.run_name(row, lr, seed)
    run_dir.mkdir(parents=True)
    lines = [json.dumps(RoundRecord(i, train={"loss": 1.0}, seconds=2.0,
                                    eval={"centralized": {"sparse_categorical_accuracy": a}}).to_json())
             for i, a in enumerate(accuracies, start=1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"rounds": planned, "model": "cnn"}))
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"total_seconds": 2.0 * len(accuracies) + 5}))
    return run_dir


@pytest.mark.unit
def test_an_unfinished_run_that_has_not_reached_the_target_yet_does_not_demote_its_rate(tmp_path):
    row = mcmahan2017.ROWS["cnn-fedavg-e5-b10-iid"]  # target 0.99
    fake_run(tmp_path, row.name, 0.05, 0, [0.98, 0.99])  # 2.0
    fake_run(tmp_path, row.name, 0.05, 1, [0.9, 0.95], finished=False)  # still training
    fake_run(tmp_path, row.name, 0.1, 0, [0.97, 0.98, 0.99])  # 3.0
    results = table.collect(tmp_path, {row.name: row})[row.name]
    assert table.best_lr(results) == 0.05
    cells = table.summary_row(row, results)
    assert cells[9:12] == ["2.0, not reached in 2 rounds (unfinished)", "-", "0.05"]


@pytest.mark.unit
def test_rates_are_compared_on_the_seeds_they_all_ran(tmp_path):
    # 0.1 ran seeds 0 and 1 (2.0 and 4.0 rounds), 0.05 only seed 0 (3.0): on seed 0, 0.1 is faster; a mean
    # over every seed (3.0 against 3.0, the tie to the smaller rate) would not have said it.
    row = mcmahan2017.ROWS["cnn-fedavg-e5-b10-iid"]  # target 0.99
    fake_run(tmp_path, row.name, 0.1, 0, [0.98, 0.99])
    fake_run(tmp_path, row.name, 0.1, 1, [0.9, 0.95, 0.98, 0.99])
    fake_run(tmp_path, row.name, 0.05, 0, [0.95, 0.98, 0.99])
    results = table.collect(tmp_path, {row.name: row})[row.name]
    assert table.best_lr(results) == 0.1
    assert table.summary_row(row, results)[9:12] == ["2.0, 4.0", f"{3.0 / row.paper_rounds:.2f}", "0.1"]


@pytest.mark.unit
def test_the_best_rate_has_the_fewest_rounds_to_target_and_unreached_rates_rank_last(tmp_path):
    row = mcmahan2017.ROWS["cnn-fedavg-e5-b10-iid"]  # target 0.99, paper 20 rounds
    fake_run(tmp_path, row.name, 0.02, 0, [0.97, 0.985, 0.989, 0.9895])  # not reached, best 0.9895
    fake_run(tmp_path, row.name, 0.05, 0, [0.97, 0.98, 0.991])  # 2 + (0.99-0.98)/(0.991-0.98) = 2.909
    fake_run(tmp_path, row.name, 0.05, 1, [0.98, 0.99])  # 2.0: mean 2.45
    fake_run(tmp_path, row.name, 0.1, 0, [0.98, 0.995])  # 1 + 0.01/0.015 = 1.667 ...
    fake_run(tmp_path, row.name, 0.2, 0, [0.5, 0.6], finished=False)  # diverging, unfinished
    results = table.collect(tmp_path, {row.name: row})[row.name]
    assert [(r.lr, r.seed) for r in results] == [(0.02, 0), (0.05, 0), (0.05, 1), (0.1, 0), (0.2, 0)]
    assert table.best_lr(results) == 0.1
    # Without 0.1, 0.05 wins (mean over its two seeds), and 0.02 (not reached) beats 0.2 on accuracy.
    assert table.best_lr([r for r in results if r.lr != 0.1]) == 0.05
    assert table.best_lr([r for r in results if r.lr in (0.02, 0.2)]) == 0.02
    assert table.best_lr([]) is None
    assert reproduce.best_lrs(tmp_path, {row.name: row}) == {row.name: [0.1]}  # `--lrs best`
    text = table.render({row.name: row}, {row.name: results}, datetime.datetime(2026, 12, 1, 12, 0))
    summary = next(line for line in text.splitlines() if line.startswith(f"| {row.name} |"))
    assert "| 1.7 | 0.08 | 0.1 | 0.02, 0.05, 0.1, 0.2 |" in summary  # rounds, ratio to 20, best lr, grid
    for expected in ("| 0.02 | 0 | not reached in 4 rounds | 0.9895 |", "| 0.05 | 0 | 2.9 |", "| 0.05 | 1 | 2.0 |",
                     "| 0.2 | 0 | not reached in 2 rounds (unfinished) | 0.6000 | 2 | unfinished (2 of 50 rounds) |"):
        assert expected in text
    assert "2026-12-01 12:00 UTC" in text


@pytest.mark.unit
def test_a_tie_goes_to_the_smaller_rate_and_each_seed_is_shown(tmp_path):
    row = mcmahan2017.ROWS["2nn-fedavg-e1-b10-iid"]  # target 0.97
    for lr in (0.1, 0.05):
        for seed in (0, 1):
            fake_run(tmp_path, row.name, lr, seed, [0.9, 0.97])
    results = table.collect(tmp_path, {row.name: row})[row.name]
    assert table.best_lr(results) == 0.05
    cells = table.summary_row(row, results)
    assert cells[9:12] == ["2.0, 2.0", f"{2 / row.paper_rounds:.2f}", "0.05"]


@pytest.mark.unit
def test_rows_not_run_and_directories_without_rounds_are_shown_as_such(tmp_path, capsys):
    rows = {name: mcmahan2017.ROWS[name] for name in ("cnn-fedsgd-iid", "2nn-fedsgd-iid")}
    (tmp_path / reproduce.run_name("cnn-fedsgd-iid", 0.1, 0)).mkdir()  # started, no round yet
    (tmp_path / "notes").mkdir()  # not a grid run: ignored
    written = table.write(tmp_path, rows)
    assert [p.name for p in written] == ["table.md", "curves.png"]
    text = (tmp_path / "table.md").read_text()
    assert "| cnn-fedsgd-iid | CNN | FedSGD | 1 | inf | 1 | IID | 99% | 626 (Table 2) | not run |" in text
    assert "| 2nn-fedsgd-iid | 2NN | FedSGD | 1 | inf | 1 | IID | 97% | 1474 (Table 1) | not run |" in text
    assert "skipped" in capsys.readouterr().err


@pytest.mark.unit
def test_the_papers_rows_are_the_shipped_configs():
    shipped = {path.stem for path in (ROOT / "configs" / "mcmahan2017").glob("*.yaml")}
    assert set(mcmahan2017.ROWS) == shipped
    for row in mcmahan2017.ROWS.values():
        config = yaml.safe_load((ROOT / "configs" / "mcmahan2017" / f"{row.name}.yaml").read_text())
        assert config["preprocess"]["epochs"] == row.epochs
        assert config["preprocess"]["batch_size"] == (row.batch_size or 0)
        assert (config["data"]["partition"] == "iid") == row.iid
        assert f"(the paper: {row.paper_rounds} rounds to {row.target:.0%}" in config_comment(row.name)
    assert mcmahan2017.ROWS["cnn-fedavg-e5-b10-iid"].updates == 300
    assert mcmahan2017.ROWS["cnn-fedavg-e20-b10-iid"].updates == 1200


def config_comment(name: str) -> str:
    return (ROOT / "configs" / "mcmahan2017" / f"{name}.yaml").read_text().split("\nname:")[0]



def test_mnist_pixels_keeps_mnists_convention_when_asked():
    """`data.mnist_pixels: mnist` (the paper's input, 0.0 = background) beside the default EMNIST convention."""
    from fedmnist.data import mnist
    from test_mcmahan2017 import fake_arrays

    train, test = fake_arrays(train=40, test=10)
    as_paper = mnist.federate(train, test, num_clients=4, pixels="mnist")
    as_emnist = mnist.federate(train, test, num_clients=4)
    images = test[0].astype("float32") / 255.0
    assert abs(as_paper.central_test[0] - images).max() < 1e-6
    assert abs(as_emnist.central_test[0] - (1.0 - images)).max() < 1e-6
