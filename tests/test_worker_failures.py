"""A run survives its workers: real `worker_binary` processes killed, stopped or absent (no mocks).

A lost local worker is restarted and the interrupted round repeated, giving exactly the run an
uninterrupted one gives; past `worker_retries`, or for a worker that stops answering, the run saves
its state and exits 1 with one line; nothing hangs and no worker is left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import portpicker
import pytest
import tensorflow as tf

from fedmnist import config as config_lib
from fedmnist import loop, runtime, train
from fedmnist.outputs.metrics_log import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 6
OVERRIDES = ["data.dataset=digits", f"rounds={ROUNDS}", "histogram_every=0", "eval_every=0"]


def make_config(*extra: str) -> config_lib.Config:
    return config_lib.load(None, [*OVERRIDES, *extra])


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the same config, in this process."""
    run_dir = tmp_path_factory.mktemp("reference")
    loop.train(make_config(), run_dir, echo=quiet, progress=False)
    return run_dir


def model_weights(run_dir: Path) -> list[np.ndarray]:
    return tf.keras.models.load_model(run_dir / loop.MODEL_FILE).get_weights()


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Per-round metrics and final weights equal (atol 1e-6)."""
    rows, expected = MetricsLog(run_dir).records(), MetricsLog(reference).records()
    assert [r.round for r in rows] == [r.round for r in expected] == list(range(1, ROUNDS + 1))
    for row, want in zip(rows, expected):
        for key, value in want.train.items():
            assert row.train[key] == pytest.approx(value, abs=1e-6), (row.round, key)
    for got, want in zip(model_weights(run_dir), model_weights(reference)):
        np.testing.assert_allclose(got, want, atol=1e-6)


def kill_during_round(round_num: int, pick_worker=lambda workers: workers[0]):
    """An `echo` for `loop.train` that SIGKILLs a worker just after round `round_num - 1` is printed:
    the round that printed it is still reading learning rates from the worker, or the next one is
    training. Returns (echo, lines, killed pids)."""
    lines, killed = [], []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith(f"round {round_num - 1:2d},") and not killed:
            pid = pick_worker(runtime.active_runtime()).process.pid
            killed.append(pid)
            threading.Timer(0.02, os.kill, (pid, signal.SIGKILL)).start()

    return echo, lines, killed


def test_a_killed_worker_is_restarted_and_the_run_equals_an_uninterrupted_one(reference, tmp_path):
    echo, lines, killed = kill_during_round(3)
    loop.train(make_config(), tmp_path, echo=echo, progress=False)

    assert killed
    [restart] = [line for line in lines if " died " in line]
    repeated = int(re.fullmatch(r"worker 1 died \(signal 9\) during round (\d+); restarted, repeating round \1",
                                restart).group(1))
    assert repeated in (2, 3)
    events = {r.round: r.events for r in MetricsLog(tmp_path).records() if r.events}
    assert events == {repeated: [{"event": "worker_restarted", "worker": "worker 1", "cause": "died (signal 9)"}]}
    assert _tensorboard_scalars(tmp_path, "runtime/worker_restarts") == {repeated: 1.0}
    assert_same_run(tmp_path, reference)
    assert not runtime.worker_children()


def test_with_two_workers_a_killed_one_is_replaced_and_the_run_is_the_same(reference, tmp_path):
    echo, lines, killed = kill_during_round(3, pick_worker=lambda workers: workers[1])
    loop.train(make_config("num_workers=2"), tmp_path, echo=echo, progress=False)

    assert [line for line in lines if " died " in line][0].startswith("worker 2 died (signal 9) during round ")
    rows, expected = MetricsLog(tmp_path).records(), MetricsLog(reference).records()
    for row, want in zip(rows, expected):  # two workers sum in another order: float32 rounding only
        assert row.train["loss"] == pytest.approx(want.train["loss"], abs=1e-5)
    for got, want in zip(model_weights(tmp_path), model_weights(reference)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert not runtime.worker_children()


def _tensorboard_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    if tag not in events.Tags()["tensors"]:
        return {}
    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}


# --- The command line: real subprocesses, killed and stopped workers ------------------------------

def start_cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "fedmnist.train", "--quiet", "--run-dir", str(run_dir)]
    for override in (*OVERRIDES, *overrides):
        args += ["--set", override]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, prefix: str, deadline_seconds: float = 300) -> list[str]:
    """Reads the CLI's stdout until a line starts with `prefix` (the deadline only guards a hang)."""
    lines, deadline = [], time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"the CLI ended before {prefix!r}: {lines} {process.stderr.read()}")
        lines.append(line.rstrip("\n"))
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no {prefix!r} line: {lines}")


def worker_pids(run_dir: Path) -> list[int]:
    """Every worker_binary the run started, in order, as its worker.log records them."""
    return [int(line.split(" pid ")[1].split()[0]) for line in (run_dir / "worker.log").read_text().splitlines()
            if line.startswith("fedmnist: worker_binary pid")]


def wait_for_new_worker(run_dir: Path, count: int, deadline_seconds: float = 120) -> int:
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        pids = worker_pids(run_dir)
        if len(pids) >= count:
            return pids[count - 1]
        time.sleep(0.05)
    raise AssertionError(f"worker {count} never started")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killed_again_after_every_restart_the_cli_stops_with_one_line_and_resume_finishes(reference, tmp_path):
    process = start_cli(tmp_path, "worker_retries=1")
    try:
        wait_for_line(process, "round  2,")
        os.kill(worker_pids(tmp_path)[0], signal.SIGKILL)
        os.kill(wait_for_new_worker(tmp_path, 2), signal.SIGKILL)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 1, err
    error_lines = [line for line in err.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "Traceback" not in err, err
    assert error_lines[0].startswith("error: worker 1 at 127.0.0.1:")
    assert re.search(r"died \(signal 9\) during round [23], after 1 restart \(worker_retries\)", error_lines[0])
    assert f"resume with: python -m fedmnist.train --resume {tmp_path}" in error_lines[0]
    assert re.search(r"the state after round [12] is saved", error_lines[0])
    assert (tmp_path / "checkpoints" / "round_1").is_dir()
    assert not any(alive(pid) for pid in worker_pids(tmp_path))

    assert train.main(["--resume", str(tmp_path), "--quiet"]) == 0
    assert_same_run(tmp_path, reference)


@contextlib.contextmanager
def cli_with_a_stopped_worker(run_dir: Path, *overrides: str) -> Iterator[subprocess.Popen]:
    """A CLI run whose worker gets SIGSTOP after round 2; the worker must not outlive the run."""
    process, pid = start_cli(run_dir, f"rounds={ROUNDS * 100}", *overrides), None
    try:
        wait_for_line(process, "round  2,")
        pid = worker_pids(run_dir)[0]
        os.kill(pid, signal.SIGSTOP)
        yield process
    finally:
        process.kill()
        if pid and alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the stopped worker outlived the run")


def test_a_stopped_worker_is_lost_after_the_timeout_and_not_left_behind(tmp_path):
    with cli_with_a_stopped_worker(tmp_path, "worker_timeout_seconds=3") as process:
        out, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    assert "did not answer for 3 s (worker_timeout_seconds)" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_ctrl_c_while_the_worker_is_stuck_exits_at_once_with_the_resume_hint(tmp_path):
    with cli_with_a_stopped_worker(tmp_path, "worker_timeout_seconds=600") as process:
        time.sleep(4)  # the watch calls a worker stalled after 3 s without an answer
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "the round cannot finish, its worker does not answer" in err
    assert f"resume with: python -m fedmnist.train --resume {tmp_path}" in err


def test_an_unreachable_workers_entry_fails_within_the_deadline_with_one_line(tmp_path, capsys):
    port = portpicker.pick_unused_port()
    code = train.main(["--quiet", "--run-dir", str(tmp_path / "run"), "--set", "data.dataset=digits",
                       "--set", f"workers=[127.0.0.1:{port}]", "--set", "worker_timeout_seconds=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert [line for line in err.splitlines() if line.strip()] == [
        f"error: TFF worker at 127.0.0.1:{port} did not answer within 2 s"]
