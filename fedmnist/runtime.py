"""The TFF runtime: a `worker_binary` process that this package starts, owns and stops.

On import TFF installs a context that lazily launches `worker_binary` on first use, hands it the
parent's stdout and never stops it (so `python -m fedmnist.train | tail` would hang). Here the
package launches the worker itself instead: its output goes to a log file (or nowhere), the kernel
kills it when the parent dies, even by SIGKILL (`PR_SET_PDEATHSIG`), and `stop()` ends it
explicitly. The execution context is TFF's own `SyncExecutionContext` speaking gRPC to it, exactly
what `tff.backends.native.set_sync_local_cpp_execution_context` builds.

Importing this module replaces TFF's default context by one that starts such a worker on first use
(for notebooks and library use); `local_runtime()` gives a run its own worker for its duration.

With several workers (local ones the package starts, or `python -m fedmnist.worker` processes named
by address) each round's clients are split across them by TFF's mergeable-computation context
(`tff.backends.native.create_mergeable_comp_execution_context`): every worker trains its share of
the clients and pre-aggregates it, and the partial aggregates are merged.

`worker_binary` has no option to choose its listening address: it listens on all interfaces with
unauthenticated gRPC, so run it (and fedmnist) only where its ports are unreachable from untrusted hosts.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import portpicker
import tensorflow_federated as tff

_PR_SET_PDEATHSIG = 1
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_OPTIONS = [
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
]
_STARTUP_TIMEOUT_SECONDS = 60.0
# The worker deserializes every client's data every round into buffers of a few hundred KB. glibc
# keeps such freed buffers in its heap, fragmented, and the worker's RSS grows round after round;
# served by mmap instead, they go back to the system when freed (README, "Performance": flat memory).
_MMAP_THRESHOLD_BYTES = 128 * 1024
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_BYTES)}
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def release_large_buffers() -> None:
    """The same for this process, which serializes every client's data every round (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


class RuntimeStartError(RuntimeError):
    """The TFF worker could not be started or reached."""


def worker_binary_path() -> Path:
    return Path(tff.__file__).parent / "data" / "worker_binary"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL it when the parent dies.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalWorker:
    """One `worker_binary` child process serving TFF's executor service on a local port."""

    def __init__(self, port: int | None = None, max_concurrent_computation_calls: int = -1,
                 log_path: Path | None = None):
        self.port = port or portpicker.pick_unused_port()
        binary = worker_binary_path()
        if not binary.is_file():
            raise RuntimeStartError(f"TFF worker binary not found at {binary.name}; reinstall tensorflow-federated")
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [str(binary), f"--port={self.port}",
             f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=_WORKER_ENV | dict(os.environ), preexec_fn=_die_with_parent,
        )
        if log_path:
            self._log.write(f"fedmnist: worker_binary pid {self.process.pid} port {self.port}\n".encode())
            self._log.flush()
        atexit.register(self.stop)

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if hasattr(self._log, "close"):
            self._log.close()
        atexit.unregister(self.stop)


def connect(address: str, process: subprocess.Popen | None = None,
            wait: bool = True) -> tff.framework.RemoteExecutorGrpcStub:
    """Returns a stub for the executor service at `address`, once it answers (at once with `wait=False`)."""
    stub = tff.framework.RemoteExecutorGrpcStub(grpc.insecure_channel(address, _GRPC_OPTIONS))
    if wait:
        wait_until_ready(stub, address, process)
    return stub


def wait_until_ready(stub: tff.framework.RemoteExecutorGrpcStub, address: str,
                     process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
    while not stub.is_ready:
        if process is not None and process.poll() is not None:
            raise RuntimeStartError(f"TFF worker at {address} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeStartError(f"TFF worker at {address} did not answer within {_STARTUP_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.05)


def _remote_executor(stub: tff.framework.RemoteExecutorGrpcStub, cardinalities,
                     default_num_clients: int = 0) -> tff.framework.RemoteExecutor:
    cardinalities.setdefault(tff.CLIENTS, default_num_clients)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor


def _executor_factory(stub: tff.framework.RemoteExecutorGrpcStub, ready: Callable[[], None] | None = None,
                      default_num_clients: int = 0) -> tff.framework.ResourceManagingExecutorFactory:
    def stack_fn(cardinalities):
        if ready is not None:
            ready()
        return _remote_executor(stub, cardinalities, default_num_clients)

    return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def _context_kwargs(factory: tff.framework.ExecutorFactory) -> dict:
    return dict(executor_fn=factory,
                compiler_fn=tff.backends.native.desugar_and_transform_to_native,
                transform_args=tff.tensorflow.transform_args,
                transform_result=tff.tensorflow.transform_result)


def execution_context(stub: tff.framework.RemoteExecutorGrpcStub,
                      ready: Callable[[], None] | None = None) -> tff.framework.SyncExecutionContext:
    return tff.framework.SyncExecutionContext(**_context_kwargs(_executor_factory(stub, ready)))


def async_execution_context(stub: tff.framework.RemoteExecutorGrpcStub,
                            ready: Callable[[], None] | None = None) -> tff.framework.AsyncExecutionContext:
    return tff.framework.AsyncExecutionContext(**_context_kwargs(_executor_factory(stub, ready)))


def multi_worker_context(stubs: list[tff.framework.RemoteExecutorGrpcStub],
                         readies: Sequence[Callable[[], None] | None] = ()):
    """One worker: the plain sync context. Several: each round's clients split across them."""
    readies = list(readies) or [None] * len(stubs)
    if len(stubs) == 1:
        return execution_context(stubs[0], readies[0])
    return tff.backends.native.create_mergeable_comp_execution_context(
        [async_execution_context(stub, ready) for stub, ready in zip(stubs, readies)])


def _ready_once(stub: tff.framework.RemoteExecutorGrpcStub, address: str,
                process: subprocess.Popen) -> Callable[[], None]:
    """Waits for a starting worker on first use, so it boots while the computations are traced."""
    done = []

    def ready() -> None:
        if not done:
            wait_until_ready(stub, address, process)
            done.append(True)

    return ready


@contextlib.contextmanager
def local_runtime(log_path: Path | None = None, num_workers: int = 1,
                  addresses: Sequence[str] = ()) -> Iterator[list[LocalWorker]]:
    """Makes TFF's default context run on workers, and stops the workers it started on the way out.

    With `addresses` it connects to those running workers (`python -m fedmnist.worker`); otherwise
    it starts `num_workers` local ones and yields them. The previous default context is restored.
    """
    release_large_buffers()
    context_stack = tff.framework.get_context_stack()
    previous = context_stack.current
    workers: list[LocalWorker] = []
    try:
        if addresses:
            stubs, readies = [connect(address) for address in addresses], []
        else:
            for _ in range(num_workers):
                workers.append(LocalWorker(log_path=log_path))
            stubs = [connect(w.address, wait=False) for w in workers]
            readies = [_ready_once(stub, w.address, w.process) for stub, w in zip(stubs, workers)]
        context_stack.set_default_context(multi_worker_context(stubs, readies))
        yield workers
    finally:
        context_stack.set_default_context(previous)
        for worker in workers:
            worker.stop()


def start_local_runtime(log_path: Path | None = None) -> contextlib.ExitStack:
    """`local_runtime()` for interactive sessions (notebooks), where no `with` block spans cells.

    The worker serves until `.close()` is called on the returned object, or the interpreter exits
    (and, like every worker here, it dies with its parent process).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(local_runtime(log_path))
    atexit.register(stack.close)
    return stack


def worker_children() -> list[int]:
    """Process ids of `worker_binary` processes whose parent is this process."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"worker_binary" in cmdline:
            pids.append(int(entry.name))
    return pids


class _OnDemandWorker:
    """Starts one LocalWorker the first time TFF needs an executor; stopped at exit."""

    def __init__(self):
        self.worker: LocalWorker | None = None
        self.stub: tff.framework.RemoteExecutorGrpcStub | None = None

    def stack_fn(self, cardinalities):
        if self.worker is None or self.worker.process.poll() is not None:
            self.worker = LocalWorker()
            self.stub = connect(self.worker.address, self.worker.process)
        return _remote_executor(self.stub, cardinalities)


def install_default_context() -> None:
    """Makes TFF's default context one whose worker this package owns (started on first use)."""
    on_demand = _OnDemandWorker()
    factory = tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=on_demand.stack_fn)
    tff.framework.get_context_stack().set_default_context(
        tff.framework.SyncExecutionContext(**_context_kwargs(factory)))
    # Collect TFF's replaced context now: left to interpreter shutdown, its finalizer fails noisily.
    gc.collect()


install_default_context()
