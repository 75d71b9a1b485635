"""Helpers the tests share: the CLI as a subprocess or in-process, waiting on progress, processes,
TensorBoard's files, EMNIST files. Fixtures live in conftest.py.

Nothing here imports TensorFlow at import time (TensorFlow loads inside the helpers that need it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# A printed resume command starts with `uv run ` when the command ran under uv (as the suite does under
# `uv run pytest`): it must work as printed where it was run.
THROUGH_UV = "uv run " if os.environ.get("UV") else ""

LOOPBACK_IPS = {"127.0.0.1", "::ffff:127.0.0.1"}  # the second: 127.0.0.1 on a dual-stack socket
WILDCARD_IPS = {"0.0.0.0", "::"}


# --- Waiting on progress, not on a fixed budget ---------------------------------------------------

SESSION_OVER = threading.Event()  # set as the session ends: background work still waiting gives up

# The environment as the session began (this module is imported at collection, after conftest's
# pytest_configure): background work starts its processes with it (`child_env`).
SESSION_ENV = dict(os.environ)
_WORK = threading.local()  # `_WORK.running`: this thread is running background work now


def child_env(extra: dict | None = None) -> dict[str, str]:
    """The environment for a process a test starts, with `extra`: this process's; in background work, the
    session's as it began, so that a variable another test monkeypatched meanwhile (a missing C compiler,
    another cache directory) never reaches a process of background work, which may run at any time."""
    base = SESSION_ENV if getattr(_WORK, "running", False) else os.environ
    return {**base, **(extra or {})}


class Cancelled(Exception):
    """Background work stopped because the session ended."""


def cpu_seconds(*pids: int) -> float:
    """CPU time used so far by these processes and all their descendants (0 for gone ones)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for process in tree:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
    return total


def tree_progress(*pids: int) -> Callable[[], object]:
    """A progress measure for `wait_for`: the CPU time of these process trees."""
    return lambda: cpu_seconds(*pids)


def wait_for(condition: Callable[[], object], what: str, *, progress: Callable[[], object] | None = None,
             stall: float = 120.0, limit: float = 1800.0, poll: float = 0.1,
             ignore: tuple[type[BaseException], ...] = ()) -> object:
    """Polls `condition()` until it returns something truthy, and returns that.

    It fails only when `progress()` (e.g. the CPU time of the processes doing the work) has not
    changed for `stall` seconds, or after `limit` seconds in all: a loaded machine makes the wait
    longer, not the test red. Without `progress`, `stall` is a plain time limit. Exceptions in
    `ignore` raised by `condition()` count as "not yet".
    """
    started = last_change = last_sample = time.monotonic()
    last = progress() if progress else None
    while True:
        if SESSION_OVER.is_set():
            raise Cancelled(f"{what}: the test session ended first")
        try:
            value = condition()
        except ignore:
            value = None
        if value:
            return value
        now = time.monotonic()
        if progress is not None and now - last_sample >= 1.0:  # sampled once a second: it reads /proc
            last_sample, current = now, progress()
            if current != last:
                last, last_change = current, now
        if now - last_change > stall:
            raise AssertionError(f"{what}: no progress for {stall:.0f} s")
        if now - started > limit:
            raise AssertionError(f"{what}: not done after {limit:.0f} s")
        time.sleep(poll)


def wait_process(process: subprocess.Popen, what: str, stall: float = 120.0) -> int:
    """The exit code of `process`, waiting as long as it (or its children) keeps using CPU."""
    wait_for(lambda: process.poll() is not None, what, progress=tree_progress(process.pid), stall=stall)
    return process.returncode


def read_until(process: subprocess.Popen, prefix: str = "") -> list[str]:
    """Reads the process's stdout (text) until a line starts with `prefix` (by default the first line), as
    long as the process makes progress; the lines read. Fails when the output ends first."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                found.set()
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def seen() -> bool:
        if not found.is_set() and not reader.is_alive():
            raise AssertionError(f"the output ended before a line {prefix!r}: {lines} "
                                 f"{process.stderr.read() if process.stderr else ''}")
        return found.is_set()

    wait_for(seen, f"a line {prefix!r} from {' '.join(map(str, process.args))}", progress=tree_progress(process.pid))
    return lines


# --- The command line ---------------------------------------------------------------------------

@dataclass
class Done:
    """What a finished command left: its exit code and output (as subprocess.CompletedProcess)."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def python_command(module: str, *args: str, before_exec: str | None = None, through_uv: bool = False) -> list[str]:
    """`python -m MODULE ARGS` (`uv run python -m MODULE ARGS` with `through_uv`, in this environment);
    with `before_exec`, see `exec_after`."""
    command = ([os.environ["UV"], "run", "--no-sync", "python"] if through_uv else [sys.executable]) + ["-m", module,
                                                                                                    *args]
    return command if before_exec is None else exec_after(before_exec, command)


def exec_after(code: str, command: list[str]) -> list[str]:
    """`command`, run by a fresh interpreter that first runs `code` (a signal's disposition, a resource limit)
    and then execs it, keeping its process id: the package's `processes.exec_after`, which does what
    `preexec_fn` would without running Python in a fork of this process (whose gRPC fork handlers sometimes
    aborted the fork: docs/measurements.md, "Worker start aborts")."""
    from fedmnist.runtime.processes import exec_after as launched

    return launched(code, command)


def run_cli(*args: str, cwd: Path, module: str = "fedmnist.train", env: dict | None = None,
            stall: float = 120.0, before_exec: str | None = None) -> Done:
    """Runs `python -m MODULE ARGS` as a user does, with stdout and stderr captured through pipes.

    The pipes matter: if a TFF worker outlived the command holding its stdout, the output would never
    end, and this call fails (after `stall` seconds without any CPU use) instead of returning.
    """
    return run_command(python_command(module, *args, before_exec=before_exec), cwd=cwd, env=env, stall=stall)


def run_command(command: list[str], cwd: Path, env: dict | None = None, stall: float = 120.0) -> Done:
    """`run_cli` for any command line."""
    process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=child_env(env))
    output: dict[str, str] = {}
    readers = [threading.Thread(target=lambda n=name, s=stream: output.__setitem__(n, s.read()), daemon=True)
               for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
    for reader in readers:
        reader.start()
    try:
        wait_process(process, " ".join(command[1:]), stall)
        # The command has exited; its output ends when every process holding the pipes is gone.
        wait_for(lambda: not any(reader.is_alive() for reader in readers),
                 f"{' '.join(command[1:])}: a process still holds the command's output after it exited",
                 stall=stall)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return Done(command, process.returncode, output["stdout"], output["stderr"])


def start_cli(*args: str, cwd: Path, module: str = "fedmnist.train", before_exec: str | None = None,
              through_uv: bool = False, **popen) -> subprocess.Popen:
    """`python -m MODULE ARGS` (through `uv run` with `through_uv`) started in the background, output piped
    as text."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True,
             "stdin": subprocess.DEVNULL, "env": child_env()} | popen
    return subprocess.Popen(python_command(module, *args, before_exec=before_exec, through_uv=through_uv),
                            cwd=cwd, **popen)


@contextlib.contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """Restores SIGINT and SIGTERM handlers on the way out (`fedmnist.train.main` installs its own)."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def train_main(*args: str) -> Done:
    """`python -m fedmnist.train ARGS` run in this process, for tests where a fresh process is not the
    point: its exit code and what it printed (the progress bar's tqdm.write lines included)."""
    from fedmnist import train

    out, err = io.StringIO(), io.StringIO()
    with kept_signal_handlers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(list(args))
    return Done(["fedmnist.train", *args], code, out.getvalue(), err.getvalue())


# --- Runs ----------------------------------------------------------------------------------------

def metrics_rows(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one JSON object per round."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def quiet_train(config, run_dir: Path, **kwargs) -> dict:
    """`loop.train` into `run_dir` (created), without output; its summary."""
    from fedmnist import loop

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return loop.train(config, run_dir, echo=lambda line: None, progress=False, **kwargs)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read with TensorBoard's own reader."""
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"]
            if accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"}


def final_weights(run_dir: Path) -> list[np.ndarray]:
    import tensorflow as tf

    return tf.keras.models.load_model(Path(run_dir) / "model.keras").get_weights()


# --- Processes -----------------------------------------------------------------------------------

def assert_same_run(run_dir: Path, reference: Path, atol: float = 1e-6) -> None:
    """Two runs agree round for round: every round's training metrics, and the final weights, within `atol`."""
    import pytest

    from fedmnist.outputs.metrics_log import MetricsLog

    rows, expected = MetricsLog(run_dir).records(), MetricsLog(reference).records()
    assert [r.round for r in rows] == [r.round for r in expected] == list(range(1, len(expected) + 1))
    for row, want in zip(rows, expected):
        for key, value in want.train.items():
            assert row.train[key] == pytest.approx(value, abs=atol), (row.round, key)
    for got, want in zip(final_weights(run_dir), final_weights(reference)):
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@dataclass(frozen=True)
class LoggedWorker:
    """A worker_binary as the run's worker.log records it. Pids are reused (threads take them too), so a
    test that looks long after the run names the process by its port as well."""

    pid: int
    port: int

    def alive(self) -> bool:
        return process_alive(self.pid, command_has=f"--port={self.port}".encode())


def logged_workers(run_dir: Path) -> list[LoggedWorker]:
    """Every worker_binary the run started, in order, as its worker.log records them."""
    log = Path(run_dir) / "worker.log"
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("fedmnist: worker_binary pid"):
            words = line.split()
            found.append(LoggedWorker(int(words[words.index("pid") + 1]), int(words[words.index("port") + 1])))
    return found


def listening_ips(pid: int) -> set[str]:
    """The local IP addresses that process `pid` listens on."""
    import psutil

    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def process_alive(pid: int, command_has: bytes = b"") -> bool:
    """True when `pid` is a live process (not a zombie, not a thread of another process) whose command
    line contains `command_has`."""
    try:
        proc = Path(f"/proc/{pid}")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        leader = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("Tgid:"))
        command = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    return state != "Z" and int(leader.split()[1]) == pid and command_has in command


def wait_gone(processes: Iterable[int | LoggedWorker], what: str, stall: float = 60.0) -> None:
    """Waits until none of `processes` (pids or logged workers) is alive (a dying process uses no CPU: a
    plain time limit)."""
    processes = list(processes)

    def alive(process: int | LoggedWorker) -> bool:
        return process.alive() if isinstance(process, LoggedWorker) else process_alive(process)

    try:
        wait_for(lambda: not any(alive(process) for process in processes), what, stall=stall)
    except AssertionError as error:
        raise AssertionError(f"{error}; still alive: {[p for p in processes if alive(p)]}") from None


def children(parent: int, marker: bytes) -> list[int]:
    """Child processes of `parent` whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def project_workers() -> set[int]:
    """TFF worker_binary processes started from this project's environment, whoever their parent."""
    ours = str(Path(sys.prefix).resolve()).encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        if b"worker_binary" in command and command.startswith(ours) and process_alive(int(entry.name)):
            pids.add(int(entry.name))
    return pids


# --- Data files ----------------------------------------------------------------------------------

def write_emnist_sqlite(path: Path, clients: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]) -> None:
    """Writes `clients[split][client_id] = (pixels, labels)` in TFF's emnist_all.sqlite format."""
    import tensorflow as tf

    connection = sqlite3.connect(path)
    connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
                       "serialized_example_proto BLOB NOT NULL)")
    connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
                       "num_examples INTEGER NOT NULL)")
    for split, by_client in clients.items():
        for client_id, (pixels, labels) in by_client.items():
            for image, label in zip(pixels, labels):
                example = tf.train.Example(features=tf.train.Features(feature={
                    "pixels": tf.train.Feature(float_list=tf.train.FloatList(value=image.reshape(-1))),
                    "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
                }))
                connection.execute("INSERT INTO examples VALUES (?, ?, ?)",
                                   (split, client_id, example.SerializeToString()))
            connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?)", (client_id, split, len(labels)))
    connection.commit()
    connection.close()


# --- Small synthetic runs (client tensors, workers, the benchmark) --------------------------------

SMALL = ["data.dataset=synthetic", "data.num_clients=8", "data.examples_per_client=33",
         "clients_per_round=4", "client_selection=uniform", "rounds=3", "eval_clients=4", "seed=3"]


def small_config(*overrides: str):
    from fedmnist import config as config_lib

    return config_lib.load(None, SMALL + list(overrides))


def small_run(config, run_dir: Path) -> list[dict]:
    """Trains `config` in this process; its metrics rows. Every worker it started is stopped."""
    from fedmnist import runtime

    before = runtime.worker_children()  # other tests' session-wide workers may be running
    quiet_train(config, run_dir)
    assert runtime.worker_children() == before
    return metrics_rows(run_dir)


def assert_same_rounds(a: list[dict], b: list[dict], tolerance: float) -> None:
    """Two runs' rounds agree: the same clients, and training and final evaluation metrics."""
    import pytest

    assert [r["clients"] for r in a] == [r["clients"] for r in b]
    for row_a, row_b in zip(a, b):
        for key in ("loss", "sparse_categorical_accuracy", "num_examples", "num_batches"):
            assert row_a["train"][key] == pytest.approx(row_b["train"][key], abs=tolerance), (row_a, row_b)
    for split in ("train", "test"):
        for key, value in a[-1]["eval"][split].items():
            assert value == pytest.approx(b[-1]["eval"][split][key], abs=tolerance)


# --- Work in the background ----------------------------------------------------------------------

class Background:
    """Work run in a background thread from the start of the session, so that the processes it drives
    (a CLI, a notebook's kernel) run while other tests run in this process.

    A test module lists its background work in `BACKGROUND` (fixture name -> Background); conftest's
    `background_work` fixture schedules, as the session begins, the work of every such fixture a
    selected test uses, in the order the tests use it, and ends it when the session ends.
    `PARALLEL` threads work through the queue: this machine has two cores, and the tests in this
    process keep one busy. The fixture calls `result()`, which returns the work's value or raises its
    error; until the work is done it does the next queued work itself (or this work, if not started),
    so that both cores stay busy while the tests wait.
    """

    PARALLEL = 1
    _queue: list[Background] = []
    _scheduled: list[Background] = []
    _lock = threading.Lock()
    _runners: list[threading.Thread] = []

    def __init__(self, function: Callable[[Path], object], name: str | None = None,
                 cleanup: Callable[[object], None] | None = None):
        """`cleanup(value)` ends what the work leaves running (processes) when no test took its value."""
        self.function, self.name, self.cleanup = function, name or function.__name__, cleanup
        self.directory: Path | None = None
        self._taken = False
        self._claimed = False
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def schedule(self, tmp_path_factory) -> None:
        """Queues the work (once); it gets a fresh directory from `tmp_path_factory`."""
        with Background._lock:
            if self.directory is not None:
                return
            self.directory = tmp_path_factory.mktemp(self.name)
            Background._queue.append(self)
            Background._scheduled.append(self)
            if len([t for t in Background._runners if t.is_alive()]) < Background.PARALLEL:
                runner = threading.Thread(target=Background._run_queue, name="background work", daemon=True)
                Background._runners.append(runner)
                runner.start()

    def result(self, tmp_path_factory):
        self.schedule(tmp_path_factory)
        if self._claim():
            self._run()  # not started yet: now, in this thread
        while not self._done.is_set():
            # Running in the background still: do the next queued work here meanwhile, rather than idle.
            other = Background._next()
            if other is None:
                self._done.wait()
            else:
                other._run()
        self._taken = True
        if self._error is not None:
            raise self._error
        return self._value

    def _claim(self) -> bool:
        with Background._lock:
            if self._claimed:
                return False
            self._claimed = True
            if self in Background._queue:
                Background._queue.remove(self)
            return True

    def _run(self) -> None:
        outer, _WORK.running = getattr(_WORK, "running", False), True
        try:
            self._value = self.function(self.directory)
        except BaseException as error:  # noqa: BLE001 - handed to the test that asks for the result
            self._error = error
        finally:
            _WORK.running = outer
            self._done.set()

    @staticmethod
    def _next() -> Background | None:
        """The first queued work, claimed; None when the queue is empty."""
        with Background._lock:
            if not Background._queue or SESSION_OVER.is_set():
                return None
            work = Background._queue.pop(0)
            work._claimed = True
            return work

    @staticmethod
    def _run_queue() -> None:
        while (work := Background._next()) is not None:
            work._run()

    @staticmethod
    def end_session() -> None:
        """Drops work not started, makes running work give up its waits, and waits for it to end."""
        SESSION_OVER.set()
        with Background._lock:
            for work in Background._queue:
                work._claimed = True
                work._error = Cancelled(f"{work.name}: the test session ended first")
                work._done.set()
            Background._queue.clear()
        for runner in Background._runners:
            runner.join()
        for work in Background._scheduled:
            if work.cleanup is not None and work._done.is_set() and not work._taken and work._error is None:
                work.cleanup(work._value)


def file_size_limit(nbytes: int) -> str:
    """Python code that makes this process's writes past `nbytes` of a file fail with EFBIG (instead of a
    SIGXFSZ kill), as a full disk fails them: for `before_exec` or the start of a script."""
    return ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({nbytes}, {nbytes}))")
