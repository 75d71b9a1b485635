"""Runs that survive: kill, interrupt, corrupt checkpoints, resume; and determinism.

The runs that are killed or signalled are real `python -m fedmnist.train` processes; the reference
run and the resumes run `fedmnist.train.main` in this process, where a fresh process is not the point.
"""

import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import (ROOT, THROUGH_UV, Background, LoggedWorker, final_weights, logged_workers, metrics_rows, quiet_train,
                     scalars, start_cli, train_main, tree_progress, wait_for, wait_gone, wait_process)

ROUNDS = 6
ARGS = ["--dataset", "digits", "--rounds", str(ROUNDS), "--quiet", "--set", "eval_every=2"]


def comparable_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics_rows(run_dir)]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    assert comparable_rows(run_dir) == comparable_rows(reference)
    for got, want in zip(final_weights(run_dir), final_weights(reference)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    steps = {tag: [step for step, _ in values] for tag, values in scalars(run_dir).items()}
    assert steps["loss/local_training"] == list(range(1, ROUNDS + 1))  # no round twice, none missing
    assert steps["loss/evaluation_on_test_data"] == [2, 4, 6]


def resume(run_dir: Path, *more: str):
    """`python -m fedmnist.train --resume RUN_DIR`, in this process."""
    return train_main("--resume", str(run_dir), *more)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "reference"
    done = train_main(*ARGS, "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


def start(run_dir: Path) -> subprocess.Popen:
    return start_cli(*ARGS, "--run-dir", str(run_dir), cwd=ROOT)


def wait_for_round(run_dir: Path, cli: subprocess.Popen, round_num: int) -> None:
    """Until the CLI has logged `round_num` rounds, as long as it makes progress."""
    path = run_dir / "metrics.jsonl"

    def logged() -> bool:
        assert cli.poll() is None, cli.stderr.read()
        return path.exists() and len(path.read_text().splitlines()) >= round_num

    wait_for(logged, f"round {round_num} of the CLI", progress=tree_progress(cli.pid), poll=0.02)


@dataclass
class Stopped:
    """A CLI run stopped from outside, as it was left."""

    run_dir: Path
    returncode: int
    stderr: str
    worker: LoggedWorker
    worker_alive_before_stop: bool


def stop_cli(run_dir: Path, round_num: int, signum: int) -> Stopped:
    """Starts the CLI, sends `signum` once it has logged `round_num` rounds, and waits for it to end."""
    cli = start(run_dir)
    try:
        wait_for_round(run_dir, cli, round_num)
        worker = logged_workers(run_dir)[0]
        alive = worker.alive()
        cli.send_signal(signum)
        # After SIGINT or SIGTERM the round in flight ends and is checkpointed first.
        wait_process(cli, f"the CLI after {signal.Signals(signum).name}")
    finally:
        if cli.poll() is None:
            cli.kill()
        _, err = cli.communicate()
    return Stopped(run_dir, cli.returncode, err, worker, alive)


# Each CLI runs in the background from the start of the session; the tests resume them in this process.
BACKGROUND = {
    "killed_run": Background(lambda directory: stop_cli(directory / "killed", 3, signal.SIGKILL), "killed"),
    "interrupted_run": tuple(Background(lambda directory, s=signum: stop_cli(directory / s.name, 2, s), signum.name)
                             for signum in (signal.SIGINT, signal.SIGTERM)),
}


@pytest.fixture
def killed_run(tmp_path_factory) -> Stopped:
    return BACKGROUND["killed_run"].result(tmp_path_factory)


@pytest.fixture(params=[0, 1], ids=["SIGINT", "SIGTERM"])
def interrupted_run(request, tmp_path_factory) -> Stopped:
    return BACKGROUND["interrupted_run"][request.param].result(tmp_path_factory)


def test_sigkill_then_resume_equals_one_uninterrupted_run(reference, killed_run):
    # Killed as soon as round 3 was logged, usually before its checkpoint.
    run_dir = killed_run.run_dir
    assert killed_run.returncode == -signal.SIGKILL and killed_run.worker_alive_before_stop
    # The kernel takes the killed CLI's worker with it (PR_SET_PDEATHSIG).
    wait_gone([killed_run.worker], "the killed CLI's worker")
    assert len(comparable_rows(run_dir)) >= 3 and not (run_dir / "summary.json").exists()
    done = resume(run_dir)
    assert done.returncode == 0, done.stderr
    assert "resuming after round" in done.stdout
    assert_same_run(run_dir, reference)


def test_interrupt_keeps_state_and_says_how_to_resume(reference, interrupted_run):
    stopped = interrupted_run
    run_dir, err = stopped.run_dir, stopped.stderr
    assert stopped.returncode == 130
    assert f"resume with: {THROUGH_UV}python -m fedmnist.train --resume {run_dir}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert stopped.worker_alive_before_stop and not stopped.worker.alive()
    saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("round_*"))
    assert saved and saved[-1] == len(comparable_rows(run_dir))
    done = resume(run_dir)
    assert done.returncode == 0, done.stderr
    assert_same_run(run_dir, reference)


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(reference, tmp_path):
    run_dir = tmp_path / "corrupt"
    shutil.copytree(reference, run_dir)
    newest = run_dir / "checkpoints" / f"round_{ROUNDS}"
    (newest / "saved_model.pb").write_bytes(b"garbage")
    intact = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir() if p != newest}
    (run_dir / "summary.json").unlink()
    done = resume(run_dir)
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
    done = resume(run_dir)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: checkpoint round_{ROUNDS} does not match this run's model and "
                                   "optimizers (other shapes or types), and no older checkpoint is usable")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_a_finished_run_extends_with_more_rounds(reference, tmp_path):
    run_dir = tmp_path / "extended"
    shutil.copytree(reference, run_dir)
    again = resume(run_dir)
    assert again.returncode == 2 and "already has all 6 rounds" in again.stderr
    done = resume(run_dir, "--rounds", str(ROUNDS + 1))
    assert done.returncode == 0, done.stderr
    assert [row["round"] for row in comparable_rows(run_dir)] == list(range(1, ROUNDS + 2))
    assert comparable_rows(run_dir)[:ROUNDS] == comparable_rows(reference)


def test_same_config_and_seed_give_identical_runs(tmp_path):
    from fedmnist import config as config_lib

    config = config_lib.load(None, ["data.dataset=synthetic", "data.num_clients=8", "clients_per_round=4",
                                    "client_selection=uniform", "rounds=2", "model=cnn", "preprocess.epochs=1",
                                    "data.examples_per_client=20", "seed=5"])
    for name in ("first", "second"):
        quiet_train(config, tmp_path / name)
    assert comparable_rows(tmp_path / "first") == comparable_rows(tmp_path / "second")
    for got, want in zip(final_weights(tmp_path / "first"), final_weights(tmp_path / "second")):
        np.testing.assert_array_equal(got, want)
    recorded = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert recorded["seed"] == 5 and set(recorded["versions"]) >= {"fedmnist", "tensorflow", "tensorflow-federated"}
