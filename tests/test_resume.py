"""Runs that survive: kill, interrupt, corrupt checkpoints, resume; and determinism."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from conftest import ROOT, process_alive, run_cli, worker_pid
from test_cli import scalars

ROUNDS = 6
ARGS = ["--dataset", "digits", "--rounds", str(ROUNDS), "--quiet", "--set", "eval_every=2"]


def comparable_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def final_weights(run_dir: Path) -> list[np.ndarray]:
    return tf.keras.models.load_model(run_dir / "model.keras").get_weights()


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert comparable_rows(run_dir) == comparable_rows(reference)
    for got, want in zip(final_weights(run_dir), final_weights(reference)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    steps = {tag: [step for step, _ in values] for tag, values in scalars(run_dir).items()}
    assert steps["train/loss"] == list(range(1, ROUNDS + 1))  # no round twice, none missing
    assert steps["eval/test/loss"] == [2, 4, 6]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    done = run_cli(*ARGS, "--run-dir", str(run_dir), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return run_dir


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedmnist.train", *ARGS, "--run-dir", str(run_dir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_round(run_dir: Path, cli: subprocess.Popen, round_num: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= round_num):
        assert cli.poll() is None, cli.stderr.read()
        assert time.monotonic() < deadline, f"round {round_num} never finished"
        time.sleep(0.02)


def test_sigkill_then_resume_equals_one_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "killed"
    cli = start(run_dir)
    wait_for_round(run_dir, cli, 3)  # as soon as round 3 is logged, usually before its checkpoint
    cli.kill()
    cli.communicate(timeout=60)
    assert len(comparable_rows(run_dir)) >= 3 and not (run_dir / "summary.json").exists()
    done = run_cli("--resume", str(run_dir), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "resuming after round" in done.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_state_and_says_how_to_resume(reference, tmp_path, signum):
    run_dir = tmp_path / signum.name
    cli = start(run_dir)
    wait_for_round(run_dir, cli, 2)
    cli.send_signal(signum)
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 130
    assert f"resume with: python -m fedmnist.train --resume {run_dir}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert not process_alive(worker_pid(run_dir))
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("round_*"))
    assert saved and saved[-1] == len(comparable_rows(run_dir))
    done = run_cli("--resume", str(run_dir), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert_same_run(run_dir, reference)


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(reference, tmp_path):
    run_dir = tmp_path / "corrupt"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / f"round_{ROUNDS}"
    (newest / "saved_model.pb").write_bytes(b"garbage")
    intact = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir() if p != newest}
    (run_dir / "summary.json").unlink()
    done = run_cli("--resume", str(run_dir), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"checkpoint round_{ROUNDS} is unreadable" in done.stdout
    assert (run_dir / "checkpoints" / f"corrupt-round_{ROUNDS}" / "saved_model.pb").read_bytes() == b"garbage"
    assert_same_run(run_dir, reference)
    for name, mtime in intact.items():
        if (run_dir / "checkpoints" / name).exists():
            assert (run_dir / "checkpoints" / name).stat().st_mtime_ns == mtime


def test_checkpoint_of_another_model_is_named_and_left_alone(reference, tmp_path):
    run_dir = tmp_path / "other-model"
    shutil.copytree(reference, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"], config["rounds"] = "cnn", ROUNDS + 2
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    done = run_cli("--resume", str(run_dir), cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: checkpoint round_{ROUNDS} does not match this run's model and "
                                   "optimizers (other shapes or types), and no older checkpoint is usable")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_finished_run_extends_with_more_rounds(reference, tmp_path):
    run_dir = tmp_path / "extended"
    shutil.copytree(reference, run_dir)
    again = run_cli("--resume", str(run_dir), cwd=ROOT)
    assert again.returncode == 2 and "already has all 6 rounds" in again.stderr
    done = run_cli("--resume", str(run_dir), "--rounds", str(ROUNDS + 1), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [row["round"] for row in comparable_rows(run_dir)] == list(range(1, ROUNDS + 2))
    assert comparable_rows(run_dir)[:ROUNDS] == comparable_rows(reference)


def test_same_config_and_seed_give_identical_runs(tmp_path):
    from fedmnist import config as config_lib
    from fedmnist import loop

    config = config_lib.load(None, ["data.dataset=synthetic", "data.num_clients=8", "clients_per_round=4",
                                    "client_selection=uniform", "rounds=3", "model=cnn", "preprocess.epochs=1",
                                    "data.examples_per_client=20", "seed=5"])
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        loop.train(config, tmp_path / name, echo=lambda line: None, progress=False)
    assert comparable_rows(tmp_path / "first") == comparable_rows(tmp_path / "second")
    for got, want in zip(final_weights(tmp_path / "first"), final_weights(tmp_path / "second")):
        np.testing.assert_array_equal(got, want)
    recorded = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert recorded["seed"] == 5 and set(recorded["versions"]) >= {"fedmnist", "tensorflow", "tensorflow-federated"}
