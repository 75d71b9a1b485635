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
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import portpicker
import pytest

from fedmnist import config as config_lib
from fedmnist import loop, runtime
from fedmnist.outputs.metrics_log import MetricsLog
from helpers import (ROOT, THROUGH_UV, Background, LoggedWorker, assert_same_run, final_weights, logged_workers,
                     process_alive, read_until, scalars, start_cli, train_main, tree_progress, wait_for, wait_gone,
                     wait_process)

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
    others = set(runtime.worker_children())  # workers of this session's other tests
    echo, lines, killed = kill_during_round(3)
    loop.train(make_config(), tmp_path, echo=echo, progress=False)

    assert killed
    [restart] = [line for line in lines if " died " in line]
    repeated = int(re.fullmatch(r"worker 1 died \(signal 9\) during round (\d+); restarted, repeating round \1",
                                restart).group(1))
    assert repeated in (2, 3)
    events = {r.round: r.events for r in MetricsLog(tmp_path).records() if r.events}
    assert events == {repeated: [{"event": "worker_restarted", "worker": "worker 1", "cause": "died (signal 9)"}]}
    assert {step: value for step, value in scalars(tmp_path).get("round/worker_restarts", [])} == {repeated: 1.0}
    assert_same_run(tmp_path, reference)
    assert set(runtime.worker_children()) <= others


def test_with_two_workers_a_killed_one_is_replaced_and_the_run_is_the_same(reference, tmp_path):
    others = set(runtime.worker_children())
    echo, lines, killed = kill_during_round(3, pick_worker=lambda workers: workers[1])
    loop.train(make_config("num_workers=2"), tmp_path, echo=echo, progress=False)

    assert [line for line in lines if " died " in line][0].startswith("worker 2 died (signal 9) during round ")
    rows, expected = MetricsLog(tmp_path).records(), MetricsLog(reference).records()
    for row, want in zip(rows, expected):  # two workers sum in another order: float32 rounding only
        assert row.train["loss"] == pytest.approx(want.train["loss"], abs=1e-5)
    for got, want in zip(final_weights(tmp_path), final_weights(reference)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert set(runtime.worker_children()) <= others


# --- The command line: real subprocesses, killed and stopped workers ------------------------------
# Each CLI runs in the background from the start of the session (helpers.Background); the tests
# check what it left.

def start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return start_cli("--quiet", "--run-dir", str(run_dir), *(f"--set={o}" for o in (*OVERRIDES, *overrides)),
                     cwd=ROOT)


def wait_for_new_worker(run_dir: Path, count: int, process: subprocess.Popen) -> int:
    workers = wait_for(lambda: len(logged_workers(run_dir)) >= count and logged_workers(run_dir),
                       f"worker {count} of the CLI", progress=tree_progress(process.pid))
    return workers[count - 1].pid


@dataclass
class Ended:
    """How a CLI run ended."""

    run_dir: Path
    returncode: int
    stderr: str
    workers: list[LoggedWorker]


def run_to_its_end(directory: Path, act: Callable[[subprocess.Popen], None], *overrides: str) -> Ended:
    """Starts the CLI with `overrides`, lets `act(process)` do to it what the test does, and waits for it
    to end: how it ended."""
    process = start(directory, *overrides)
    try:
        act(process)
        wait_process(process, "the CLI")
    finally:
        if process.poll() is None:
            process.kill()
        _, err = process.communicate()
    return Ended(directory, process.returncode, err, logged_workers(directory))


def killed_after_every_restart(directory: Path) -> Ended:
    """`worker_retries=1`: the worker killed after round 2, and its replacement killed too. The run is
    planned far longer than ROUNDS so that it is still training when the kills land, however slowly
    this test reads its output; the resume shortens it to ROUNDS."""
    def kill_both(process: subprocess.Popen) -> None:
        read_until(process, "round  2,")
        os.kill(logged_workers(directory)[0].pid, signal.SIGKILL)
        os.kill(wait_for_new_worker(directory, 2, process), signal.SIGKILL)

    return run_to_its_end(directory, kill_both, "worker_retries=1", f"rounds={ROUNDS * 100}")


@contextlib.contextmanager
def cli_with_a_stopped_worker(run_dir: Path, *overrides: str) -> Iterator[subprocess.Popen]:
    """A CLI run whose worker gets SIGSTOP after round 2; the worker must not outlive the run."""
    process, pid = start(run_dir, f"rounds={ROUNDS * 100}", *overrides), None
    try:
        read_until(process, "round  2,")
        pid = logged_workers(run_dir)[0].pid
        os.kill(pid, signal.SIGSTOP)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
        if pid and process_alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("the stopped worker outlived the run")


def stopped_worker_times_out(directory: Path) -> Ended:
    with cli_with_a_stopped_worker(directory, "worker_timeout_seconds=3") as process:
        wait_process(process, "the CLI with a stopped worker")
        err = process.stderr.read()
    return Ended(directory, process.returncode, err, logged_workers(directory))


def ctrl_c_with_a_stopped_worker(directory: Path) -> Ended:
    with cli_with_a_stopped_worker(directory, "worker_timeout_seconds=600") as process:
        # By then the next round is waiting on the stopped worker. The watch calls a worker stalled after
        # 3 s without an answer; a Ctrl-C that comes before (a busy machine) asks to stop after the round,
        # and the stall, once seen, stops the run at once all the same.
        time.sleep(4)
        process.send_signal(signal.SIGINT)
        wait_process(process, "the CLI after Ctrl-C")
        err = process.stderr.read()
    return Ended(directory, process.returncode, err, logged_workers(directory))


def paused_past_the_timeout(directory: Path) -> Ended:
    """The CLI and its worker stopped together (SIGSTOP, as a suspended machine stops both) for longer than
    `worker_timeout_seconds`, after round 2 (round 3, ten epochs long, computing), then continued: the CLI
    first, the worker a second later (a machine waking up does not wake every process at the same instant)."""
    def pause(process: subprocess.Popen) -> None:
        read_until(process, "round  2,")
        worker = logged_workers(directory)[0].pid
        for pid in (process.pid, worker):
            os.kill(pid, signal.SIGSTOP)
        time.sleep(3 + 5)  # the pause itself, past the timeout: nothing runs to wait for
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):  # a run that gave up on its worker has stopped it
            os.kill(worker, signal.SIGCONT)

    return run_to_its_end(directory, pause, "worker_timeout_seconds=3", "preprocess.epochs=10")


BACKGROUND = {
    "paused": Background(paused_past_the_timeout),
    "killed_twice": Background(killed_after_every_restart),
    "timed_out": Background(stopped_worker_times_out),
    "interrupted": Background(ctrl_c_with_a_stopped_worker),
}


@pytest.fixture
def paused(tmp_path_factory) -> Ended:
    return BACKGROUND["paused"].result(tmp_path_factory)


@pytest.fixture
def killed_twice(tmp_path_factory) -> Ended:
    return BACKGROUND["killed_twice"].result(tmp_path_factory)


@pytest.fixture
def timed_out(tmp_path_factory) -> Ended:
    return BACKGROUND["timed_out"].result(tmp_path_factory)


@pytest.fixture
def interrupted(tmp_path_factory) -> Ended:
    return BACKGROUND["interrupted"].result(tmp_path_factory)


def test_killed_again_after_every_restart_the_cli_stops_with_one_line_and_resume_finishes(reference, killed_twice,
                                                                                         tmp_path):
    run_dir, err = killed_twice.run_dir, killed_twice.stderr
    assert killed_twice.returncode == 1, err
    error_lines = [line for line in err.splitlines() if line.strip()]
    assert len(error_lines) == 1 and "Traceback" not in err, err
    assert error_lines[0].startswith("error: worker 1 at 127.0.0.1:")
    # The round the kills land in depends on how soon this busy machine lets the test see the round lines.
    died = int(re.search(r"died \(signal 9\) during round (\d+), after 1 restart \(worker_retries\)",
                         error_lines[0]).group(1))
    assert died >= 2
    assert f"the state after round {died - 1} is saved" in error_lines[0]
    assert f"resume with: {THROUGH_UV}python -m fedmnist.train --resume {run_dir}" in error_lines[0]
    assert (run_dir / "checkpoints" / f"round_{died - 1}").is_dir()
    wait_gone(killed_twice.workers, "the CLI's workers")

    rounds = max(ROUNDS, died)
    done = train_main("--resume", str(run_dir), "--rounds", str(rounds), "--quiet")
    assert done.returncode == 0, done.stderr
    if rounds > ROUNDS:
        reference = tmp_path / "reference"
        loop.train(make_config(f"rounds={rounds}"), reference, echo=quiet, progress=False)
    assert_same_run(run_dir, reference)


def test_a_run_paused_with_its_worker_past_the_timeout_goes_on_when_both_continue(paused):
    # A worker's silence while the run's own process did not run is no verdict: a pause is not a stall.
    assert paused.returncode == 0, paused.stderr
    assert [r.round for r in MetricsLog(paused.run_dir).records()] == list(range(1, ROUNDS + 1))


def test_a_stopped_worker_is_lost_after_the_timeout_and_not_left_behind(timed_out):
    assert timed_out.returncode == 1, timed_out.stderr
    assert "did not answer for 3 s (worker_timeout_seconds)" in timed_out.stderr
    assert len([line for line in timed_out.stderr.splitlines() if line.strip()]) == 1, timed_out.stderr
    wait_gone(timed_out.workers, "the CLI's workers")


def test_ctrl_c_while_the_worker_is_stuck_exits_at_once_with_the_resume_hint(interrupted):
    assert interrupted.returncode == 130, interrupted.stderr
    assert "the round cannot finish, its worker does not answer" in interrupted.stderr
    assert f"resume with: {THROUGH_UV}python -m fedmnist.train --resume {interrupted.run_dir}" in interrupted.stderr


def test_an_unreachable_workers_entry_fails_within_the_deadline_with_one_line(tmp_path):
    port = portpicker.pick_unused_port()
    done = train_main("--quiet", "--run-dir", str(tmp_path / "run"), "--set", "data.dataset=digits",
                      "--set", f"workers=[127.0.0.1:{port}]", "--set", "worker_timeout_seconds=2")
    assert done.returncode == 1
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"error: TFF worker at 127.0.0.1:{port} did not answer within 2 s"]


@pytest.mark.unit
def test_a_probe_counts_any_answer_as_an_answer_and_nothing_listening_as_silence():
    from concurrent import futures

    import grpc

    from fedmnist.runtime import watch

    server = grpc.server(futures.ThreadPoolExecutor(1))  # serves no method: every call is UNIMPLEMENTED
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert watch.answers(f"127.0.0.1:{port}", 2.0)
    finally:
        server.stop(None)
    assert not watch.answers(f"127.0.0.1:{port}", 0.3)  # nothing listens there now


@pytest.mark.unit
def test_closing_a_channel_waits_for_grpc_only_so_long():
    from fedmnist.runtime import watch

    class StuckChannel:  # gRPC's close blocked for good once, racing another thread's (black-holed TLS worker)
        def __init__(self):
            self.entered, self.release = threading.Event(), threading.Event()

        def close(self):
            self.entered.set()
            self.release.wait()

    channel = StuckChannel()
    closing = threading.Thread(target=watch.close_channel, args=(channel,), kwargs={"wait": 0.05}, daemon=True)
    closing.start()
    closing.join(60)  # a close waited for without a bound would wait for good: fail, not hang
    try:
        assert not closing.is_alive(), "close_channel waited for a close that never ends"
        assert channel.entered.is_set() and not channel.release.is_set()  # returned while the close still blocks
    finally:
        channel.release.set()


@pytest.mark.unit
def test_a_pause_that_lands_during_a_probe_is_no_silence(monkeypatch):
    # The run's process stopped (SIGSTOP, a suspended machine) while its watch waited on a probe: the probe then
    # fails at once (its deadline passed during the pause), and the worker must get a whole timeout from then,
    # as after a pause between probes, not a verdict for the time the run itself did not run.
    from fedmnist.runtime import watch as watch_module

    clock = [1000.0]
    monkeypatch.setattr(watch_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    probes = []

    def probe(self, deadline):
        probes.append(clock[0])
        if len(probes) == 1:
            clock[0] += 60.0  # paused for a minute during this probe, which then fails
            return False
        return True

    monkeypatch.setattr(watch_module.WorkerWatch, "_answers", probe)
    monkeypatch.setattr(watch_module.WatchedStub, "is_ready", property(lambda self: True))
    watch = watch_module.WorkerWatch("worker", "127.0.0.1:9", process=lambda: None, timeout=3.0, interval=0.01)
    try:
        wait_for(lambda: len(probes) >= 3 or watch.lost is not None, "the watch's probes", stall=30)
        assert watch.lost is None, watch.lost
    finally:
        watch.stop()
