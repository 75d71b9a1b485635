"""Issue 27: no one else can drive the workers (docs/security.md).

- Another Unix user attacks every socket a training run's workers listen on, as the issue's attacker
  did (tests/worker_attack.py: a computation that writes a file and reads a mode-600 one as the
  worker's user): refused; the same attack on workers without the protection (the switch
  `workers.ACCEPT_ONLY_OWN_USER`, which only this test turns off) reads the file and plants one.
- `fedmnist worker` serves its own user on loopback and refuses others; `fedmnist worker --tls` serves
  a training run that has the files docs/security.md makes, and refuses a client without a
  certificate or with one from another CA.
- A worker on a second host (a network namespace, tests/netns.py) listens only on the address it was
  given; black-holed (a route that drops packets) or cut off (the link down) mid-round, it ends the run
  like a dead worker: one line naming its address, the saved round, the resume command, within
  `worker_timeout_seconds`; the worker command still stops on SIGTERM; and with the link back, the
  resume equals an uninterrupted run (issue 26, item 7).
- A disposal (what TFF's finalizers send, from any thread) never waits on a worker that does not answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import portpicker
import psutil
import pytest

import other_user
from fedmnist import loop, runtime
from fedmnist.runtime import tls, workers
from fedmnist.runtime.watch import WorkerWatch
from helpers import (ROOT, THROUGH_UV, assert_same_run, metrics_rows, read_until, run_command, small_config, train_main,
                     tree_progress, wait_for, wait_process)
from netns import Namespaces
from tls_files import tls_files

TESTS = Path(__file__).resolve().parent
ATTACK = TESTS / "worker_attack.py"


# --- The attack ---------------------------------------------------------------------------------

def bait(directory: Path) -> tuple[Path, str]:
    """A file only this user can read (the secret the attacker tries to print), and its text."""
    secret = directory / "secret.txt"
    text = f"only the trainer may read this {uuid.uuid4()}"
    secret.write_text(text)
    secret.chmod(0o600)
    return secret, text


def run_attack(secret: Path, attempts: list[dict]) -> list[dict]:
    """tests/worker_attack.py, one process for all the attempts (a TensorFlow start each would cost
    seconds): each attempt's result, with the `planted` file it tried to write."""
    done = run_command([sys.executable, str(ATTACK), str(secret), *map(json.dumps, attempts)], cwd=TESTS)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["target"] for r in results] == [a["target"] for a in attempts], done.stdout
    return [{**result, "planted": Path(attempt["planted"])} for result, attempt in zip(results, attempts)]


def listening_targets(pids: list[int]) -> list[str]:
    """Every TCP port and Unix socket these processes listen on, as gRPC targets."""
    targets = []
    for pid in pids:
        process = psutil.Process(pid)
        for connection in process.net_connections(kind="inet"):
            if connection.status == psutil.CONN_LISTEN:
                ip = connection.laddr.ip.removeprefix("::ffff:")
                targets.append(f"[{ip}]:{connection.laddr.port}" if ":" in ip else f"{ip}:{connection.laddr.port}")
        for connection in process.net_connections(kind="unix"):
            if connection.laddr:
                targets.append(f"unix:{connection.laddr}")
    return sorted(set(targets))


def assert_refused(results: list[dict], text: str, how: str = "") -> None:
    for result in results:
        assert result["read"] is None and result["error"], (how, result)
        assert result["stage"] == "get_executor", (how, result)  # not one request got through
        assert not result["planted"].exists(), how
    assert text not in json.dumps(results, default=str), how


def assert_attack_worked(results: list[dict], text: str) -> None:
    for result in results:
        assert result["read"] == text, result
        planted = result["planted"]
        assert planted.read_text() == "written by the attacker" and planted.stat().st_uid == os.geteuid()


@pytest.mark.parametrize("protected", [True, False], ids=["protected", "without-protection-the-attack-works"])
def test_another_user_cannot_run_code_in_a_training_runs_workers(protected, monkeypatch, tmp_path):
    other_user.require_root()
    monkeypatch.setattr(workers, "ACCEPT_ONLY_OWN_USER", protected)
    secret, text = bait(tmp_path)
    seen = {}

    def echo(line: str) -> None:  # the run waits here, after round 1, with its two workers serving
        if line.startswith("round  1,") and not seen:
            pids = [worker.process.pid for worker in runtime.active_runtime()]
            seen["targets"] = listening_targets(pids)
            seen["results"] = run_attack(secret, [
                {"target": target, "planted": str(tmp_path / f"planted-{number}"), "as_other_user": True}
                for number, target in enumerate(seen["targets"])])

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    loop.train(small_config("num_workers=2"), run_dir, echo=echo, progress=False)

    assert len(seen["targets"]) == 2 and all(t.startswith("127.0.0.1:") for t in seen["targets"]), seen
    if protected:
        assert_refused(seen["results"], text)
        refusals = [line for line in (run_dir / "worker.log").read_text().splitlines() if "refused" in line]
        uid = other_user.other_user()[0]
        assert refusals and set(refusals) == {f"fedmnist: refused a connection from uid {uid} "
                                              f"(only uid {os.geteuid()} may connect)"}
    else:
        assert_attack_worked(seen["results"], text)
    assert [row["round"] for row in metrics_rows(run_dir)] == [1, 2, 3]  # the run went on, undisturbed


# --- fedmnist worker: loopback for its user, --tls for others -------------------------------------

def docs_tls_commands() -> str:
    """The shell block of docs/security.md's "Making the files"."""
    text = (ROOT / "docs" / "security.md").read_text()
    section = text.split("### Making the files", 1)[1]
    return section.split("```bash\n", 1)[1].split("```", 1)[0]


def make_tls_files(directory: Path, addresses: list[str]) -> Path:
    """Runs the documented commands in `directory`, the worker's certificate naming `addresses`."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command: it makes the TLS files docs/security.md describes")
    directory.mkdir(parents=True, exist_ok=True)
    commands = docs_tls_commands()
    assert "IP:10.0.0.5" in commands
    commands = commands.replace("IP:10.0.0.5", ",".join(f"IP:{address}" for address in addresses))
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=directory, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("ca.key", "worker.key", "run.key"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600
    return directory


@contextlib.contextmanager
def worker_command(*arguments: str, namespace: list[str] = ()) -> Iterator[tuple[subprocess.Popen, int, str]]:
    """`python -m fedmnist.worker --port P ARGUMENTS` (in a network namespace: `namespace` is the prefix
    `netns.Namespaces.inside` gives), once it serves: the process, P and its serving line. Stopped by
    SIGTERM on the way out if still running."""
    port = 8000 if namespace else portpicker.pick_unused_port()  # a namespace of its own: no one else's port
    command = subprocess.Popen([*namespace, sys.executable, "-m", "fedmnist.worker", "--port", str(port), *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = read_until(command)[0]
        assert "serving on" in line and f"port {port}" in line, (line, command.stderr.read() if command.poll() else "")
        yield command, port, line.rstrip("\n")
    finally:
        try:
            if command.poll() is None:
                command.send_signal(signal.SIGTERM)
                stopped(command)
        finally:
            command.kill()  # only if it did not stop: a failed test leaves no worker behind
            command.communicate(timeout=60)


def stopped(command: subprocess.Popen) -> int:
    """Its exit code, once it exits: within 5 s of SIGTERM by design, so a plain limit (an idle worker's
    gRPC threads use CPU: "as long as it makes progress" would wait on a hung command for half an hour)."""
    wait_for(lambda: command.poll() is not None, "the worker command after SIGTERM", stall=30)
    return command.returncode


def test_the_worker_command_serves_its_own_user_on_loopback_and_refuses_another(tmp_path):
    other_user.require_root()
    secret, text = bait(tmp_path)
    with worker_command("--log", str(tmp_path / "worker.log")) as (command, port, line):
        assert line.endswith("for this user's processes only; Ctrl-C to stop")
        [binary] = psutil.Process(command.pid).children()
        targets = listening_targets([binary.pid])
        assert targets == [f"127.0.0.1:{port}"]
        own, other = run_attack(secret, [
            {"target": targets[0], "planted": str(tmp_path / "planted-by-its-user")},
            {"target": targets[0], "planted": str(tmp_path / "planted-by-another-user"), "as_other_user": True}])
        assert_attack_worked([own], text)  # its own user is served: the attack itself works
        assert_refused([other], text)
    assert f"refused a connection from uid {other_user.other_user()[0]}" in (tmp_path / "worker.log").read_text()


def test_the_worker_command_with_tls_serves_a_run_with_the_documented_files_and_refuses_others(
        tmp_path, monkeypatch, prepared_run):
    files = make_tls_files(tmp_path / "tls", ["127.0.0.1"])
    strangers = make_tls_files(tmp_path / "another-ca", ["127.0.0.1"])
    secret, text = bait(tmp_path)
    arguments = ["--tls", "--ca", str(files / "ca.pem"), "--cert", str(files / "worker.pem"),
                 "--key", str(files / "worker.key")]
    with worker_command(*arguments) as (command, port, line):
        assert "with mutual TLS" in line
        [binary] = psutil.Process(command.pid).children()
        assert listening_targets([binary.pid]) == [f"unix:{binary.net_connections(kind='unix')[0].laddr}"]
        assert listening_targets([command.pid]) == [f"127.0.0.1:{port}"]  # the only TCP port: TLS
        socket_dir = Path(binary.net_connections(kind="unix")[0].laddr).parent
        assert socket_dir.stat().st_mode & 0o777 == 0o700 and socket_dir.stat().st_uid == os.geteuid()

        # A second process, the training run, with the run's files: the rounds a local worker gives.
        for name, file in (("CA", "ca.pem"), ("CERT", "run.pem"), ("KEY", "run.key")):
            monkeypatch.setenv(f"FEDMNIST_TLS_{name}", str(files / file))
        from helpers import assert_same_rounds, small_run

        remote = small_run(small_config(f"workers=[127.0.0.1:{port}]"), tmp_path / "run")
        assert_same_rounds(prepared_run, remote, tolerance=1e-6)

        target = f"127.0.0.1:{port}"
        refused = {  # how -> TLS files, if any
            "plain gRPC": {},
            "TLS without a certificate": {"ca": str(files / "ca.pem")},
            "a certificate from another CA": {"ca": str(files / "ca.pem"), "cert": str(strangers / "run.pem"),
                                              "key": str(strangers / "run.key")},
        }
        good = {"ca": str(files / "ca.pem"), "cert": str(files / "run.pem"), "key": str(files / "run.key")}
        *results, served = run_attack(secret, [
            {"target": target, "planted": str(tmp_path / f"planted-{number}"), **credentials}
            for number, credentials in enumerate([*refused.values(), good])])
        for how, result in zip(refused, results):
            assert_refused([result], text, how)
        assert_attack_worked([served], text)  # a holder of the CA's certificate may run code: by design
    assert command.returncode == 0 and not socket_dir.exists()


def test_a_tls_worker_whose_worker_stops_answering_stops_serving(tmp_path):
    # Behind the TLS front a run's probes reach the front, not the worker: the command watches the worker
    # itself, so that a stopped one ends in a lost worker for the runs instead of calls that never return.
    files = make_tls_files(tmp_path / "tls", ["127.0.0.1"])
    with worker_command("--tls", "--ca", str(files / "ca.pem"), "--cert", str(files / "worker.pem"),
                        "--key", str(files / "worker.key"), "--worker-timeout", "3") as (command, _, _):
        [binary] = psutil.Process(command.pid).children()
        binary.suspend()  # SIGSTOP
        try:
            wait_for(lambda: command.poll() is not None, "the TLS worker command with a stopped worker", stall=60)
        finally:
            if binary.is_running():
                binary.resume()
        assert command.returncode == 1
        assert [line for line in command.stderr.read().splitlines() if line.startswith("error:")] == [
            "error: the TFF worker did not answer for 3 s (--worker-timeout); stopped serving"]
        wait_for(lambda: not binary.is_running() or binary.status() == psutil.STATUS_ZOMBIE, "the stopped worker",
                 stall=30)


def test_a_run_refuses_a_worker_whose_certificate_names_another_address(tmp_path, monkeypatch):
    files = make_tls_files(tmp_path / "tls", ["10.0.0.5"])
    arguments = ["--tls", "--ca", str(files / "ca.pem"), "--cert", str(files / "worker.pem"),
                 "--key", str(files / "worker.key")]
    with worker_command(*arguments) as (_, port, _):
        for name, file in (("CA", "ca.pem"), ("CERT", "run.pem"), ("KEY", "run.key")):
            monkeypatch.setenv(f"FEDMNIST_TLS_{name}", str(files / file))
        with pytest.raises(runtime.RuntimeStartError) as raised:
            with runtime.local_runtime(addresses=[f"127.0.0.1:{port}"], timeout=3.0):
                pass
    assert str(raised.value) == (f"TFF worker at 127.0.0.1:{port}: its certificate is not accepted "
                                 "(IP address mismatch, certificate is not valid for '127.0.0.1'.)")


@pytest.mark.unit
def test_a_runs_tls_files_come_from_the_environment_all_three_or_none(tmp_path):
    assert tls.from_environment({}) is None
    files = tls.from_environment({"FEDMNIST_TLS_CA": "a", "FEDMNIST_TLS_CERT": "b", "FEDMNIST_TLS_KEY": "c"})
    assert files == tls.TlsFiles(Path("a"), Path("b"), Path("c"))
    with pytest.raises(tls.TlsError, match="FEDMNIST_TLS_KEY not set: a run's TLS needs all of"):
        tls.from_environment({"FEDMNIST_TLS_CA": "a", "FEDMNIST_TLS_CERT": "b"})


def test_a_run_whose_tls_files_cannot_be_used_stops_in_one_line_with_exit_2(tmp_path, monkeypatch):
    files = tls_files(tmp_path / "tls")
    files.key.chmod(0o644)
    for name, path in (("CA", files.ca), ("CERT", files.cert), ("KEY", files.key)):
        monkeypatch.setenv(f"FEDMNIST_TLS_{name}", str(path))
    done = train_main("--quiet", "--run-dir", str(tmp_path / "run"), "--set", "data.dataset=digits",
                      "--set", "workers=[127.0.0.1:8000]")
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        f"error: the private key {files.key} can be read by other users (mode 644); chmod 600 {files.key}"]
    assert not (tmp_path / "run").exists()


def test_a_run_does_not_send_its_data_to_a_loopback_port_another_user_listens_on():
    # A fake worker: another user's gRPC server where the run's `workers:` entry points (the port of a
    # worker that died, say). It would receive the run's data and choose what the run gets back.
    other_user.require_root()
    port = portpicker.pick_unused_port()
    code = ("import concurrent.futures.thread, time, grpc\n" + other_user.BECOME_OTHER_USER + "\n"
            "server = grpc.server(concurrent.futures.ThreadPoolExecutor(1))\n"
            f"server.add_insecure_port('127.0.0.1:{port}')\nserver.start()\n"
            "print('listening', flush=True)\ntime.sleep(600)")
    impostor = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert impostor.stdout.readline() == "listening\n"
        with pytest.raises(runtime.RuntimeStartError) as raised:
            with runtime.local_runtime(addresses=[f"127.0.0.1:{port}"], timeout=3.0):
                pass
    finally:
        impostor.kill()
        impostor.communicate()
    assert str(raised.value).startswith(f"TFF worker at 127.0.0.1:{port} is served by another user "
                                        f"(uid {other_user.other_user()[0]})")


# --- A remote worker on a second host (network namespaces: tests/netns.py) -------------------------

WORKER = Namespaces.WORKER
TIMEOUT = 5  # worker_timeout_seconds: seconds, not the default 20, and still above a TLS probe on a loaded machine
# Past the verdict the run only exits (each round's checkpoint is written when the round ends): the
# margin is for a loaded machine, and far below the kernel's TCP timeout (~15 minutes) runs used to wait.
EXIT_MARGIN_SECONDS = 15
RUN_SETTINGS = ["data.dataset=digits", "histogram_every=0", "eval_every=0", f"worker_timeout_seconds={TIMEOUT}"]


def train_in(namespaces: Namespaces, *arguments: str) -> list[str]:
    """`python -m fedmnist.train --quiet ARGUMENTS` in the run's namespace."""
    return [*namespaces.inside(namespaces.run), sys.executable, "-m", "fedmnist.train", "--quiet", *arguments]


def cut_off_mid_round(namespaces: Namespaces, port: int, run_dir: Path, cut: Callable[[], None],
                      env: dict | None = None) -> tuple[list[str], float]:
    """Starts a long run whose `workers:` is the worker's address, `cut()`s the worker off once round 2 is
    saved (the next round is training; the round's line comes before the end of the round, whose learning
    rates the worker still reads), and waits for the run to end with exit code 1: the lines it wrote on
    stderr, and the seconds from the cut to its end."""
    settings = [*RUN_SETTINGS, "rounds=600", f"workers=[{WORKER}:{port}]"]
    env = {**(env or os.environ), "PYTHONFAULTHANDLER": "1"}  # a hung run, sent SIGABRT, shows its threads
    run = subprocess.Popen(train_in(namespaces, "--run-dir", str(run_dir), *(f"--set={s}" for s in settings)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        read_until(run, "round  2,")
        wait_for(lambda: (run_dir / "checkpoints" / "round_2").is_dir() or run.poll() is not None,
                 "round 2's checkpoint", progress=tree_progress(run.pid))
        cut()
        cut_at = time.monotonic()
        # A run waiting on its worker uses no CPU, so this wait has a plain limit.
        try:
            wait_for(lambda: run.poll() is not None, "the run after its worker was cut off",
                     stall=TIMEOUT + EXIT_MARGIN_SECONDS + 60)
        except AssertionError as hung:
            run.send_signal(signal.SIGABRT)
            raise AssertionError(f"{hung}; its threads and output: {run.communicate(timeout=60)[1]}") from None
        ended = time.monotonic() - cut_at
    finally:
        if run.poll() is None:
            run.kill()
        err = run.communicate()[1] if run.stderr and not run.stderr.closed else ""
    assert run.returncode == 1, err
    return [line for line in err.splitlines() if line.strip()], ended


def saved_round_in_the_lost_worker_line(lines: list[str], port: int, run_dir: Path, plain: bool) -> int:
    """The run's one line (after, for a plain-gRPC worker, its one warning) names the worker's address,
    the timeout, the saved round and the resume command; returns the saved round."""
    if plain:
        warning = lines.pop(0)
        assert warning.startswith(f"fedmnist: warning: worker {WORKER}:{port} reached in plain gRPC"), warning
    [line] = lines
    match = re.fullmatch(
        rf"error: worker 1 at {re.escape(WORKER)}:{port} did not answer for {TIMEOUT} s "
        rf"\(worker_timeout_seconds\) during round \d+; the state after round (\d+) is saved; "
        rf"resume with: {re.escape(THROUGH_UV)}python -m fedmnist\.train --resume {re.escape(str(run_dir))}", line)
    assert match, line
    saved = int(match.group(1))
    assert saved >= 2 and (run_dir / "checkpoints" / f"round_{saved}").is_dir()
    return saved


def test_a_black_holed_tls_worker_ends_the_run_within_the_timeout_with_the_resume_line(namespaces, tmp_path):
    # With --tls the run talks to the worker command's TLS front; with --insecure (the test below, whose
    # link is taken down) to worker_binary itself: a silent worker ends the run alike on both paths.
    files = make_tls_files(tmp_path / "tls", [WORKER])
    env = {**os.environ, "FEDMNIST_TLS_CA": str(files / "ca.pem"), "FEDMNIST_TLS_CERT": str(files / "run.pem"),
           "FEDMNIST_TLS_KEY": str(files / "run.key")}
    run_dir = tmp_path / "run"
    with worker_command("--host", WORKER, "--tls", "--ca", str(files / "ca.pem"), "--cert", str(files / "worker.pem"),
                        "--key", str(files / "worker.key"), namespace=namespaces.inside(namespaces.worker)) as (
            command, port, _):
        assert namespaces.listening(namespaces.worker) == {f"{WORKER}:{port}"}  # the TLS front only
        lines, ended = cut_off_mid_round(namespaces, port, run_dir, namespaces.black_hole, env)
        saved_round_in_the_lost_worker_line(lines, port, run_dir, plain=False)
        assert ended < TIMEOUT + EXIT_MARGIN_SECONDS, ended

        # The worker command, its client gone without a word, still stops on SIGTERM.
        command.send_signal(signal.SIGTERM)
        assert stopped(command) == 0


def test_a_worker_on_another_host_listens_only_there_and_a_run_cut_off_from_it_resumes_to_the_uninterrupted_run(
        namespaces, tmp_path):
    # Issue 26 item 7: `fedmnist worker --host` on a second host, the link pulled mid-round, put back.
    run_dir = tmp_path / "run"
    with worker_command("--host", WORKER, "--insecure", namespace=namespaces.inside(namespaces.worker)) as (
            command, port, _):
        assert namespaces.listening(namespaces.worker) == {f"{WORKER}:{port}"}  # not loopback, not everywhere
        lines, ended = cut_off_mid_round(namespaces, port, run_dir, namespaces.cut)
        saved = saved_round_in_the_lost_worker_line(lines, port, run_dir, plain=True)
        assert ended < TIMEOUT + EXIT_MARGIN_SECONDS, ended

        namespaces.restore()
        rounds = saved + 2  # the interrupted round again, and one more
        resume = subprocess.Popen(train_in(namespaces, "--resume", str(run_dir), "--rounds", str(rounds)),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            # Meanwhile (TensorFlow loads in the resume), the uninterrupted run: the same settings on a
            # local worker, which computes what a remote one does.
            reference = train_main("--quiet", "--run-dir", str(tmp_path / "reference"),
                                   *(f"--set={s}" for s in (*RUN_SETTINGS, f"rounds={rounds}")))
            assert reference.returncode == 0, reference.stderr
            assert wait_process(resume, "the resumed run") == 0, resume.stderr.read()
        finally:
            resume.kill()  # only if it did not end
            resume.communicate(timeout=60)
        command.send_signal(signal.SIGTERM)  # its first client gone without a word, it still stops at once
        assert stopped(command) == 0
    assert_same_run(run_dir, tmp_path / "reference")


# --- Finalizers never wait -------------------------------------------------------------------------

def test_a_disposal_never_waits_for_a_worker_that_does_not_answer():
    """TFF disposes of remote values from finalizers, which run in whatever thread collects them, the
    watch's own included; one that waited on a silent worker stopped the watch that should declare the
    worker lost (issue 27's black hole: no verdict, and a signal swallowed in the finalizer)."""
    from tensorflow_federated.proto.v0 import executor_pb2

    worker = runtime.LocalWorker()
    try:
        worker.connect()
        watch = WorkerWatch("worker 1", worker.address, lambda: worker.process, timeout=600)
        wait_for(lambda: watch.stub.is_ready, "the worker's first answer", stall=60)
        os.kill(worker.process.pid, signal.SIGSTOP)  # silent from now on, like a black-holed one
        done = threading.Event()
        threading.Thread(target=lambda: (watch.stub.dispose(executor_pb2.DisposeRequest()), done.set()),
                         daemon=True).start()
        wait_for(done.is_set, "a disposal sent to a silent worker", stall=30)
        assert watch.lost is None  # returned at once, not when the watch gave up on the worker
        watch.stop()
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
        worker.stop(force=True)
