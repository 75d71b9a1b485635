"""`python -m fedmnist.worker` (fedmnist.runtime.worker): a TFF worker for other processes' runs, on
loopback unless told otherwise, stopped by SIGTERM with its worker_binary; bad arguments are one line."""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import portpicker
import psutil
import pytest

from fedmnist.runtime import worker
from helpers import (LOOPBACK_IPS, Background, assert_same_rounds, listening_ips, small_config, small_run, tree_progress,
                     wait_for, wait_gone, wait_process)


def first_line(process: subprocess.Popen) -> str:
    """The first line the process prints, waiting as long as it makes progress (TensorFlow's import)."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    return wait_for(lambda: (lines.get_nowait() or "(no output)") if not lines.empty() else None,
                    "the worker command's first line", progress=tree_progress(process.pid))


def start_worker_commands(*hosts: str | None) -> list[SimpleNamespace]:
    """Runs `python -m fedmnist.worker --port P [--host H]` for each host (None: no --host), started
    together so that their TensorFlow imports overlap; returns each one's port, command, worker_binary
    and "serving" line once all serve."""
    started = []
    try:
        for host in hosts:
            port = portpicker.pick_unused_port()
            command = subprocess.Popen([sys.executable, "-m", "fedmnist.worker", "--port", str(port),
                                        *(["--host", host] if host else [])],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            started.append(SimpleNamespace(port=port, command=command, binaries=[], stderr="", code=None))
        for one in started:
            one.serving = first_line(one.command)
            assert f"port {one.port}" in one.serving, one.serving
            one.binaries = psutil.Process(one.command.pid).children()
            assert [p.name() for p in one.binaries] == ["worker_binary"]
            one.binary = one.binaries[0]
    except BaseException:
        stop_worker_commands(started, check=False)
        raise
    return started


def stop_worker_commands(started: list[SimpleNamespace], check: bool = True) -> None:
    """Stops the commands by SIGTERM (once), sets each one's exit `code` and `stderr`; with `check`,
    each must exit with 0 and leave no worker_binary behind."""
    for one in started:
        if one.code is None and one.command.poll() is None:
            one.command.send_signal(signal.SIGTERM)
    for one in started:
        if one.code is None:
            one.code = wait_process(one.command, "the worker command after SIGTERM")
            one.stderr = one.command.stderr.read()
            one.command.stdout.close()
            one.command.stderr.close()
    if check:
        for one in started:
            assert one.code == 0, one.stderr
    wait_gone([p.pid for one in started for p in one.binaries], "worker_binary after its command stopped")


# Started in the background from the start of the session: their TensorFlow imports overlap other tests.
BACKGROUND = {"worker_commands": Background(lambda directory: start_worker_commands(None, "0.0.0.0"),
                                            "worker_commands", cleanup=stop_worker_commands)}


@pytest.fixture
def worker_commands(tmp_path_factory) -> Iterator[list[SimpleNamespace]]:
    started = BACKGROUND["worker_commands"].result(tmp_path_factory)
    try:
        yield started
    finally:
        stop_worker_commands(started, check=False)  # the test stops them itself, unless it failed first


def test_worker_command_listens_on_loopback_unless_told_and_serves_a_training_run(worker_commands, prepared_run,
                                                                                   tmp_path):
    default, everywhere = worker_commands
    assert "serving on 127.0.0.1 port" in default.serving
    assert listening_ips(default.binary.pid) <= LOOPBACK_IPS and listening_ips(default.binary.pid)
    assert "serving on 0.0.0.0 port" in everywhere.serving
    assert listening_ips(everywhere.binary.pid) == {"::"}  # gRPC's dual-stack wildcard socket
    remote = small_run(small_config(f"workers=[127.0.0.1:{default.port}]"), tmp_path)
    assert_same_rounds(prepared_run, remote, tolerance=1e-6)
    assert default.command.poll() is None  # the run is over; the worker serves on for others
    stop_worker_commands(worker_commands)  # SIGTERM: exit 0, and the worker_binary goes with it
    assert "unauthenticated" not in default.stderr
    assert "unauthenticated" in everywhere.stderr and "trusted network" in everywhere.stderr


@pytest.mark.unit
def test_worker_command_rejects_a_bad_host(capsys):
    assert worker.main(["--port", "8000", "--host", "worker.example"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an IP address" in err[0]


@pytest.mark.unit
def test_worker_command_rejects_a_bad_port(capsys):
    assert worker.main(["--port", "70000"]) == 2
    assert "between 1 and 65535" in capsys.readouterr().err


@pytest.mark.unit
def test_worker_command_usage_errors_are_one_line(capsys):
    assert worker.main(["--host", "127.0.0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0] and err[0].startswith("error: ")
