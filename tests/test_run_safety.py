"""Nothing lost, nothing silent: a run directory used by one command at a time, files cut by a crash, an
interrupted end of a run, divergence and bad data, and plans too large for the machine."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from helpers import (ROOT, THROUGH_UV, file_size_limit, metrics_rows, run_cli, start_cli, train_main, tree_progress,
                     wait_for, wait_process, write_emnist_sqlite)

FAST = ["--dataset", "digits", "--quiet", "--set", "histogram_every=0"]


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def rounds_of(run_dir: Path) -> list[int]:
    return [row["round"] for row in metrics_rows(run_dir)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 3-round run, copied by each test that damages it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = train_main(*FAST, "--rounds", "3", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    return run_dir


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# --- 1. One command at a time ----------------------------------------------------------------------

def test_a_second_command_on_a_run_in_use_is_refused_naming_the_process_and_the_first_is_untouched(tmp_path):
    run_dir = tmp_path / "run"
    first = start_cli(*FAST, "--rounds", "400", "--run-dir", str(run_dir), cwd=ROOT)
    try:
        wait_for(lambda: len(rounds_of(run_dir)) >= 2 if (run_dir / "metrics.jsonl").exists() else False,
                 "the first run's second round", progress=tree_progress(first.pid))
        for second in (["--resume", str(run_dir)], [*FAST, "--run-dir", str(run_dir), "--overwrite"],
                       [*FAST, "--run-dir", str(run_dir)]):
            done = train_main(*second)
            assert done.returncode == 2
            assert one_line(done.stderr) == (f"error: run directory {run_dir} is in use by process {first.pid}; "
                                             f"wait for it to end or stop it, then try again")
        first.send_signal(signal.SIGKILL)  # a kill -9 leaves no stale lock: the resume below gets it
        wait_process(first, "the killed run")
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    logged = rounds_of(run_dir)
    assert logged == list(range(1, len(logged) + 1))  # the second commands wrote nothing
    done = train_main("--resume", str(run_dir), "--rounds", str(logged[-1] + 1), "--quiet")
    assert done.returncode == 0, done.stderr
    assert rounds_of(run_dir) == list(range(1, logged[-1] + 2))


def test_the_library_refuses_a_run_directory_that_a_command_holds(tmp_path):
    from fedmnist import config as config_lib
    from fedmnist import loop
    from fedmnist.errors import UsageError
    from fedmnist.outputs import run_directory

    with run_directory.locked(tmp_path), run_directory.locked(tmp_path):
        pass  # held by this process already: a nested use of the same directory is allowed
    holder = ("import fcntl, os, sys; fd = os.open(sys.argv[1] + '/.lock', os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('locked', flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match="is in use by process 4242"):
            loop.train(config_lib.load(None, ["data.dataset=digits"]), tmp_path, echo=lambda line: None,
                       progress=False)
    finally:
        child.stdin.close()
        child.wait()


# --- 2. Files cut by a crash ------------------------------------------------------------------------

def test_resume_drops_a_cut_last_line_and_a_cut_event_record_and_removes_partial_checkpoints(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"round": 4, "clients": ["client_0')  # a crash mid-line
    (events,) = run_dir.glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-7])  # a flush cut short
    (run_dir / "checkpoints" / "round_4_temp1234").mkdir()  # a save interrupted by a full disk
    done = train_main("--resume", str(run_dir), "--rounds", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "metrics.jsonl: its last line (round 4?) was cut short" in done.stdout
    assert f"{events.name}: its last record was cut short" in done.stdout
    assert rounds_of(run_dir) == [1, 2, 3, 4]
    assert not list((run_dir / "checkpoints").glob("*_temp*"))
    from helpers import scalars

    assert [step for step, _ in scalars(run_dir)["loss/local_training"]] == [1, 2, 3, 4]


def test_a_log_damaged_before_its_end_is_one_line_naming_the_file(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    done = train_main("--resume", str(run_dir), "--rounds", "4", "--quiet")
    assert done.returncode == 1
    assert f"{run_dir / 'metrics.jsonl'} line 2 is not a round record" in one_line(done.stderr)


def test_a_rewrite_that_fails_part_way_leaves_each_file_as_it_was(finished_run, tmp_path):
    # A resume after round 1 rewrites metrics.jsonl and the events file without rounds 2-3. Here every write
    # past 256 bytes fails (EFBIG, as a full disk fails it), so each rewrite fails part way: the files must
    # be the old ones, whole (a rewrite in place would have cut them), and no partial file left. (Round 1's
    # row alone is about 570 bytes.)
    run_dir = copy_of(finished_run, tmp_path)
    (events,) = run_dir.glob("events.out.tfevents.*")
    before = {path: path.read_bytes() for path in (run_dir / "metrics.jsonl", events)}
    script = (f"{file_size_limit(256)}\n"
              "import sys\n"
              "from pathlib import Path\n"
              "from fedmnist.outputs.metrics_log import MetricsLog\n"
              "from fedmnist.outputs.tensorboard import drop_events_after\n"
              "run_dir = Path(sys.argv[1])\n"
              "for drop in (MetricsLog(run_dir).drop_after, lambda r: drop_events_after(run_dir, r)):\n"
              "    try:\n"
              "        drop(1)\n"
              "        print('rewritten')\n"
              "    except Exception as error:\n"
              "        print('failed:', type(error).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script, str(run_dir)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["failed:", "failed:"], done.stdout
    assert all(path.read_bytes() == content for path, content in before.items())
    assert not list(run_dir.glob(".partial-*"))


# --- 3. An interrupted end of the run ---------------------------------------------------------------

def test_resume_redoes_an_interrupted_finish_without_training(finished_run, tmp_path):
    run_dir = copy_of(finished_run, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    for name in ("summary.json", "model.keras", "curves.png"):
        (run_dir / name).unlink()
    (run_dir / ".partial-model.keras").write_bytes(b"cut")  # a save interrupted half way
    done = train_main("--resume", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    assert "all 3 rounds are done; finishing the run" in done.stdout
    assert rounds_of(run_dir) == [1, 2, 3]  # nothing trained again
    again = json.loads((run_dir / "summary.json").read_text())
    keys = ("local_training", "evaluation_on_training_data", "evaluation_on_test_data")
    assert {k: again[k] for k in keys} == {k: summary[k] for k in keys}
    assert (run_dir / "model.keras").stat().st_size > 0 and (run_dir / "curves.png").stat().st_size > 0
    finished = train_main("--resume", str(run_dir), "--quiet")
    assert finished.returncode == 2 and "already has all 3 rounds" in one_line(finished.stderr)


def signalled_after_round_1(run_dir: Path, signal_it: Callable[[subprocess.Popen], None], *settings: str,
                            **popen) -> tuple[int, str]:
    """A long CLI run (`--set` `settings` too) signalled by `signal_it(process)` once round 1 is logged: its
    exit code and stderr."""
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    process = start_cli(*FAST, *overrides, "--rounds", "400", "--run-dir", str(run_dir), cwd=ROOT, **popen)
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and rounds_of(run_dir),
                 "the first round", progress=tree_progress(process.pid))
        signal_it(process)
        code = wait_process(process, "the run after the signal")
    finally:
        if process.poll() is None:
            process.kill()
    return code, process.communicate()[1]


def resume_line(run_dir: Path) -> str:
    return (f"interrupted after round {rounds_of(run_dir)[-1]}; "
            f"resume with: {THROUGH_UV}python -m fedmnist.train --resume {run_dir}")


def test_sighup_stops_like_sigterm_with_a_checkpoint_and_a_resume_hint(tmp_path):
    run_dir = tmp_path / "run"
    code, err = signalled_after_round_1(run_dir, lambda process: process.send_signal(signal.SIGHUP))
    assert code == 130, err
    assert "SIGHUP: stopping after the current round" in err and resume_line(run_dir) in err
    assert (run_dir / "checkpoints" / f"round_{rounds_of(run_dir)[-1]}").is_dir()


@pytest.mark.parametrize("through_uv", [False, pytest.param(True, marks=pytest.mark.skipif(
    not os.environ.get("UV"), reason="the suite runs outside `uv run`"))], ids=["python", "uv-run"])
def test_ctrl_c_to_the_whole_group_stops_after_the_round_and_prints_only_the_interruption(tmp_path, through_uv):
    """A terminal's Ctrl-C is SIGINT to the foreground process group: the run's workers, in a group of their
    own, must not see it (it used to print "worker 1 died (signal 2) ... restarted" as well). Through
    `uv run` without a terminal, uv forwards that SIGINT to the command 0.2 s later: one request still, so
    the run finishes its round (it used to stop at once, the round lost, as for a second Ctrl-C)."""
    run_dir = tmp_path / "run"

    def ctrl_c(process: subprocess.Popen) -> None:
        if through_uv:
            # Inside round 2, not between rounds (a stop requested there ends the run before uv's copy comes).
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)

    # Through uv, rounds of about a second: uv's copy of the signal lands inside the round that the first one stops.
    code, err = signalled_after_round_1(run_dir, ctrl_c, *(["preprocess.epochs=400"] if through_uv else []),
                                        start_new_session=True,  # the command leads a group, as in a terminal
                                        before_exec="import signal; signal.signal(signal.SIGINT, signal.SIG_DFL)",
                                        through_uv=through_uv)
    assert code == 130, err
    assert err.strip().splitlines() == [
        "SIGINT: stopping after the current round (signal again to stop at once)", resume_line(run_dir)]
    assert "restarted" not in (run_dir / "metrics.jsonl").read_text()


# --- 4. Divergence and bad data ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides, cause", [
    (["client_optimizer.learning_rate=1e38"], "no client's update was finite (all 10 were NaN or infinite)"),
    (["server_optimizer.learning_rate=1e38"], "largest global weight 2.31e+36"),
])
def test_divergence_stops_the_run_with_one_line_not_success(tmp_path, overrides, cause):
    run_dir = tmp_path / "run"
    done = train_main(*FAST, "--rounds", "3", "--run-dir", str(run_dir), *(f"--set={o}" for o in overrides))
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("error: training diverged at round 1") and cause in line
    assert not run_dir.exists()  # nothing to resume: the directory went with the failed start


def test_a_run_that_diverges_after_good_rounds_stops_there_keeping_the_last_good_round(tmp_path):
    # Server momentum keeps adding round 1's step after the clients' updates vanish in float32 next to weights
    # this large: the largest weight is about 1.5e19 after round 2 and 2.2e19 after round 3 (the limit, 1.8e19).
    run_dir = tmp_path / "run"
    done = train_main(*FAST, "--rounds", "5", "--run-dir", str(run_dir), "--set", "server_optimizer.momentum=0.9",
                      "--set", "server_optimizer.learning_rate=3.5e20")
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("error: training diverged at round 3") and "largest global weight" in line
    assert line.endswith(f"the state after round 2, the last good one, is saved in {run_dir}")
    assert [r["round"] for r in metrics_rows(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_1", "round_2"]
    assert not (run_dir / "summary.json").exists()


def test_a_global_model_whose_evaluation_loss_is_not_finite_stops_the_run(tmp_path):
    # Weights below the limit can still overflow a CNN's activations: training loss finite (it is measured
    # from the weights before the round), evaluation loss NaN.
    run_dir = tmp_path / "run"
    done = train_main(*FAST, "--rounds", "2", "--run-dir", str(run_dir), "--set", "model=cnn", "--set",
                      "eval_every=1", "--set", "server_optimizer.learning_rate=1e12")
    assert done.returncode == 1
    assert one_line(done.stderr) == ("error: the global model diverged at round 1: its evaluation loss on train data "
                                     "is nan; lower the learning rates; no round completed")
    assert not run_dir.exists()


def test_mnist_pixels_that_are_not_finite_are_refused_naming_the_file(tmp_path):
    from fedmnist.data import mnist

    (train_x, train_y), test = mnist.digits_as_mnist()
    pixels = train_x.astype(np.float32)
    pixels[3, 10, 10] = np.nan
    np.savez(tmp_path / "mnist.npz", x_train=pixels, y_train=train_y, x_test=test[0], y_test=test[1])
    done = train_main("--dataset", "mnist", "--set", f"data.cache_dir={tmp_path}", "--set", "data.num_clients=20",
                      "--set", "data.allow_download=false", "--run-dir", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 1
    assert "mnist.npz in the MNIST cache is unreadable: x_train holds pixel values that are not finite" in one_line(done.stderr)


@pytest.mark.parametrize("bad_split, client_input", [("train", "prepared"), ("test", "prepared"),
                                                      ("train", "datasets"), ("test", "datasets")])
def test_an_emnist_client_with_a_label_outside_the_classes_is_one_line_naming_client_file_and_split(
        tmp_path, bad_split, client_input):
    # The article's datasets path too: there only TFF's worker read the examples, and its error took 8 lines.
    rng = np.random.default_rng(0)

    def client(label_high: int):
        return rng.uniform(0, 1, (6, 28, 28)).astype(np.float32), rng.integers(0, label_high, 6)

    splits = {split: {f"f{i:04d}_{i:02d}": client(10) for i in range(4)} for split in ("train", "test")}
    splits[bad_split]["f0002_02"] = (splits[bad_split]["f0002_02"][0], np.array([1, 2, 3, 40, 5, 6]))
    write_emnist_sqlite(tmp_path / "emnist_all.sqlite",
                        {f"digits_only_{split}": clients for split, clients in splits.items()})
    done = train_main("--dataset", "emnist", "--set", f"data.cache_dir={tmp_path}", "--clients-per-round", "4",
                      "--rounds", "1", "--set", f"client_input={client_input}", "--run-dir", str(tmp_path / "run"),
                      "--quiet")
    assert done.returncode == 1
    assert one_line(done.stderr) == (f"error: client f0002_02 of {tmp_path / 'emnist_all.sqlite'} ({bad_split} split): "
                                     f"labels outside 0..9 (found 1..40)")


# --- 5. Plans too large for the machine ------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--set", "preprocess.epochs=1000000000000", "--rounds", "1"],
     "error: preprocess.epochs: 1,000,000,000,000 epochs of a round's"),
    (["--dataset", "synthetic", "--set", "data.examples_per_client=1000000000"],
     "error: data.examples_per_client: 20 clients x 1,000,000,000 synthetic examples need"),
    (["--seed", str(10**20)], "error: seed: must be at most 4294967295, got 100000000000000000000"),
    (["--set", "preprocess.batch_size=1000000000000"],
     "error: preprocess.batch_size: must be at most 2147483647, got 1000000000000"),
    (["--set", "client_input=datasets", "--set", "preprocess.shuffle_buffer=2147483647", "--set", "eval_clients=20"],
     "error: preprocess.shuffle_buffer: 20 shuffle buffers of 2,147,483,647 examples need 1,031 GB, more than"),
    (["--set", "num_workers=100000"], "error: num_workers: 100,000 local TFF workers need about 25,000 GB"),
])
def test_sizes_beyond_the_machine_are_refused_at_once_and_leave_no_run_directory(tmp_path, args, message):
    done = run_cli(*FAST, *args, cwd=tmp_path, env={"TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# --- 6. Smaller ones -------------------------------------------------------------------------------

def test_secure_summary_counts_the_dropouts_of_every_round_across_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    secure = [*FAST, "--set", "aggregation=secure", "--set", "secure.dropout=0.3", "--set", "eval_clients=2"]
    assert train_main(*secure, "--rounds", "2", "--run-dir", str(run_dir)).returncode == 0
    done = train_main("--resume", str(run_dir), "--rounds", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    rows = metrics_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())["aggregation"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert sum(r["aggregation"]["dropped"] for r in rows[:2]) > 0  # the first process's rounds had dropouts
    assert summary["dropped_clients"] == sum(r["aggregation"]["dropped"] for r in rows)


@pytest.mark.parametrize("client_input", ["prepared", "datasets"])
def test_an_emnist_example_that_is_not_a_tf_example_is_one_line_naming_client_and_file(tmp_path, client_input):
    import sqlite3

    rng = np.random.default_rng(1)
    clients = {f"f{i:04d}_{i:02d}": (rng.uniform(0, 1, (5, 28, 28)).astype(np.float32), rng.integers(0, 10, 5))
               for i in range(3)}
    path = tmp_path / "emnist_all.sqlite"
    write_emnist_sqlite(path, {"digits_only_train": clients, "digits_only_test": clients})
    with sqlite3.connect(path) as connection:  # one example's bytes overwritten, as a damaged copy would have
        connection.execute("UPDATE examples SET serialized_example_proto = ? WHERE rowid = "
                           "(SELECT rowid FROM examples WHERE client_id = 'f0001_01' LIMIT 1)", (b"\xff\xfe garbage",))
    done = train_main("--dataset", "emnist", "--set", f"data.cache_dir={path.parent}", "--clients-per-round", "3",
                      "--set", f"client_input={client_input}", "--run-dir", str(tmp_path / "run"), "--quiet")
    assert done.returncode == 1
    assert re.match(rf"error: client f0001_01 of {re.escape(str(path))} \((train|test) split\): its examples cannot "
                    rf"be read \(", one_line(done.stderr)), done.stderr
