"""`python -m fedmnist.worker` (fedmnist.runtime.worker): a TFF worker for other processes' runs, on
loopback for its own user unless told otherwise (`--tls`, `--insecure`), stopped by SIGTERM with its
worker_binary; bad arguments are one line. tests/test_worker_security.py attacks it."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import portpicker
import psutil
import pytest

from fedmnist.runtime import worker
from tls_files import tls_files
from helpers import (LOOPBACK_IPS, Background, assert_same_rounds, child_env, listening_ips, python_command, read_until,
                     small_config, small_run, wait_for, wait_gone, wait_process)


def start_worker_commands(*arguments: list[str]) -> list[SimpleNamespace]:
    """Runs `python -m fedmnist.worker --port P ARGUMENTS` for each list of arguments, started together
    so that their TensorFlow imports overlap; returns each one's port, command, worker_binary and
    "serving" line once all serve."""
    started = []
    try:
        for extra in arguments:
            port = portpicker.pick_unused_port()
            command = subprocess.Popen([sys.executable, "-m", "fedmnist.worker", "--port", str(port), *extra],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
            started.append(SimpleNamespace(port=port, command=command, binaries=[], stderr="", code=None))
        for one in started:
            one.serving = read_until(one.command)[0]
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
BACKGROUND = {"worker_commands": Background(
    lambda directory: start_worker_commands([], ["--host", "0.0.0.0", "--insecure"]), "worker_commands",
    cleanup=stop_worker_commands)}


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
    # It serves without TensorFlow (it never calls the worker): it starts in a second, not after an import.
    for one in worker_commands:
        loaded = {Path(m.path).name for m in psutil.Process(one.command.pid).memory_maps()}
        assert not {name for name in loaded if "tensorflow" in name}, sorted(loaded)
        assert any(name.startswith("cygrpc") for name in loaded)  # the check sees what a process loaded
    assert "serving on 127.0.0.1 port" in default.serving and "for this user's processes only" in default.serving
    assert listening_ips(default.binary.pid) <= LOOPBACK_IPS and listening_ips(default.binary.pid)
    assert "serving on 0.0.0.0 port" in everywhere.serving and "--insecure" in everywhere.serving
    assert listening_ips(everywhere.binary.pid) == {"::"}  # gRPC's dual-stack wildcard socket
    remote = small_run(small_config(f"workers=[127.0.0.1:{default.port}]"), tmp_path)
    assert_same_rounds(prepared_run, remote, tolerance=1e-6)
    assert default.command.poll() is None  # the run is over; the worker serves on for others
    stop_worker_commands(worker_commands)  # SIGTERM: exit 0, and the worker_binary goes with it
    assert "unauthenticated" not in default.stderr
    [warning] = [line for line in everywhere.stderr.splitlines() if line.startswith("warning:")]
    assert "unauthenticated" in warning and "anyone who can reach port" in warning and "--tls" in warning


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


@pytest.mark.unit
@pytest.mark.parametrize("arguments, message", [
    (["--host", "10.0.0.5"], "--host 10.0.0.5: a worker off loopback serves other machines, so it needs --tls"),
    (["--host", "0.0.0.0"], "needs --tls (mutual TLS, docs/security.md), or --insecure"),
    (["--tls"], "--tls needs --ca, --cert and --key (--ca, --cert, --key missing"),
    (["--tls", "--ca", "ca.pem", "--cert", "c.pem"], "(--key missing"),
    (["--cert", "c.pem"], "--cert goes with --tls"),
    (["--tls", "--insecure"], "--tls and --insecure exclude each other"),
    (["--worker-timeout", "0"], "--worker-timeout 0 is not a positive number of seconds"),
])
def test_worker_command_refuses_unprotected_or_incomplete_modes_in_one_line(capsys, arguments, message):
    assert worker.main(["--port", "8000", *arguments]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.unit
def test_worker_command_refuses_a_log_file_it_cannot_write_in_one_line(capsys, tmp_path):
    log = tmp_path / "no-such-directory" / "worker.log"
    assert worker.main(["--port", "8000", "--log", str(log)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --log {log}: cannot write it (No such file or directory)"]


@pytest.mark.unit
def test_worker_command_checks_its_tls_files_before_tensorflow_starts(capsys, tmp_path):
    files = tls_files(tmp_path)
    arguments = ["--port", "8000", "--host", "10.0.0.5", "--tls", "--ca", str(files.ca), "--cert", str(files.cert)]
    files.key.chmod(0o644)
    assert worker.main([*arguments, "--key", str(files.key)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: the private key {files.key} can be read by other users (mode 644); chmod 600 {files.key}"
    files.key.chmod(0o600)
    other = tls_files(tmp_path / "other")
    assert worker.main([*arguments, "--key", str(other.key)]) == 2
    assert f"the private key {other.key} does not belong to the certificate {files.cert}" in capsys.readouterr().err
    assert worker.main(["--port", "8000", "--tls", "--ca", str(other.ca), "--cert", str(files.cert),
                        "--key", str(files.key)]) == 2
    assert f"the certificate {files.cert} is not signed by the CA in {other.ca}" in capsys.readouterr().err
    assert worker.main(["--port", "8000", "--tls", "--ca", str(tmp_path / "missing.pem"), "--cert", str(files.cert),
                        "--key", str(files.key)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: the CA certificate {tmp_path / 'missing.pem'} cannot be read: No such file or directory"


def test_sigterm_stops_the_worker_command_even_when_its_worker_ignores_sigint(tmp_path):
    # As in a shell script's background job (`python -m fedmnist.worker ... &`), which starts with SIGINT
    # ignored: worker_binary inherits that, so the SIGINT that asks it to stop does nothing. The command
    # used to wait for it forever; now it kills it after 5 s.
    port = portpicker.pick_unused_port()
    command = subprocess.Popen(python_command("fedmnist.worker", "--port", str(port), before_exec=(
                                   "import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)")),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"port {port}" in read_until(command)[0]
        [binary] = psutil.Process(command.pid).children()
        command.send_signal(signal.SIGTERM)
        # A plain limit, not "as long as it makes progress": an idle worker_binary's gRPC threads use CPU.
        wait_for(lambda: command.poll() is not None, "the worker command after SIGTERM", stall=30)
        assert command.returncode == 0
        wait_gone([binary.pid], "its worker_binary")
    finally:
        if command.poll() is None:
            command.kill()
        command.communicate()
