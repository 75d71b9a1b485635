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

Workers speak unauthenticated gRPC, so they listen on loopback (127.0.0.1) unless a `host` is given
explicitly. `worker_binary` itself can only listen on every interface; `fedmnist.bind` preloads a
small shim into it that turns that wildcard bind into a bind to the chosen address, compiling it with
the C compiler on first use. Where no compiler is available, the workers this package starts for its
own runs still start, on all interfaces, after one warning line on stderr; a worker asked explicitly
for one address (`python -m fedmnist.worker --host H`) does not start at all.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import portpicker
import psutil
import tensorflow_federated as tff

from fedmnist import bind

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
# One thread per TensorFlow op: the worker already trains a round's clients in parallel, one per core,
# so splitting each op across cores only adds contention, and it makes float32 sums depend on the
# thread split. With it a round is faster and its numbers do not depend on the core count (README,
# "Performance"). The environment wins: set TF_NUM_INTRAOP_THREADS to change it.
_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_THRESHOLD_BYTES), "TF_NUM_INTRAOP_THREADS": "1"}
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def release_large_buffers() -> None:
    """The same for this process, which serializes every client's data every round (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


LOOPBACK = "127.0.0.1"  # not "localhost": a client would try ::1 first, where the worker is not


class RuntimeStartError(RuntimeError):
    """The TFF worker could not be started or reached."""


def worker_binary_path() -> Path:
    return Path(tff.__file__).parent / "data" / "worker_binary"


def _unmapped(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, with an IPv4 address in its IPv6 form (::ffff:a.b.c.d) as plain IPv4."""
    address = ipaddress.ip_address(ip)
    return getattr(address, "ipv4_mapped", None) or address


# Resolved here, not in the child: between fork and exec the child must not load libraries (a lock
# another thread of this process held at the fork would never be released there).
_prctl = ctypes.CDLL(None).prctl


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL it when the parent dies.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class LocalWorker:
    """One `worker_binary` child process serving TFF's executor service on a local port.

    It listens on `host` only (loopback by default); `0.0.0.0` or `::` means every interface. Raises
    `bind.ShimBuildError` when it cannot be kept to one address (no C compiler to build the shim).
    """

    def __init__(self, port: int | None = None, max_concurrent_computation_calls: int = -1,
                 log_path: Path | None = None, host: str = LOOPBACK):
        self.host = str(ipaddress.ip_address(host))
        self.port = port or portpicker.pick_unused_port()
        binary = worker_binary_path()
        if not binary.is_file():
            raise RuntimeStartError(f"TFF worker binary not found at {binary.name}; reinstall tensorflow-federated")
        self._args = [str(binary), f"--port={self.port}",
                      f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"]
        self._env = _WORKER_ENV | dict(os.environ) | bind.child_env(self.host)
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = self._spawn()
        atexit.register(self.stop)

    def _spawn(self) -> subprocess.Popen:
        process = subprocess.Popen(self._args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                   env=self._env, preexec_fn=_die_with_parent)
        if hasattr(self._log, "write"):
            self._log.write(f"fedmnist: worker_binary pid {process.pid} port {self.port} host {self.host}\n".encode())
            self._log.flush()
        return process

    @property
    def all_interfaces(self) -> bool:
        return bind.is_all_interfaces(self.host)

    @property
    def address(self) -> str:
        """Where to reach it: its host, or loopback for one listening on every interface."""
        host = LOOPBACK if self.all_interfaces else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def connect(self, wait: bool = True) -> tff.framework.RemoteExecutorGrpcStub:
        """A stub for this worker, once it answers and listens where it should (at once with `wait=False`)."""
        stub = connect(self.address, wait=False)
        if wait:
            self.wait_until_ready(stub)
        return stub

    def wait_until_ready(self, stub: tff.framework.RemoteExecutorGrpcStub) -> None:
        try:
            wait_until_ready(stub, self.address, self.process)
        except RuntimeStartError:
            if self.process.returncode != -signal.SIGABRT:
                raise
            # The gRPC inside worker_binary rarely aborts while starting (a failed check in its epoll
            # poller: once in hundreds of starts here). A second start has always worked.
            self.process = self._spawn()
            wait_until_ready(stub, self.address, self.process)
        self.check_listening()

    def listening_addresses(self) -> set[str]:
        return {c.laddr.ip for c in psutil.Process(self.process.pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}

    def check_listening(self) -> None:
        """Stops the worker and raises RuntimeStartError if it listens beyond its host (the shim did not load)."""
        if self.all_interfaces:
            return
        stray = {ip for ip in self.listening_addresses() if _unmapped(ip) != _unmapped(self.host)}
        if stray:
            self.stop()
            raise RuntimeStartError(f"TFF worker on port {self.port} listens on {', '.join(sorted(stray))}, "
                                    f"not only {self.host}: the bind shim did not take effect")

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


def _ready_once(stub: tff.framework.RemoteExecutorGrpcStub, worker: LocalWorker) -> Callable[[], None]:
    """Waits for a starting worker on first use, so it boots while the computations are traced."""
    done = []

    def ready() -> None:
        if not done:
            worker.wait_until_ready(stub)
            done.append(True)

    return ready


_fallback_warned: list[bool] = []


def loopback_worker(**kwargs) -> LocalWorker:
    """A LocalWorker for the package's own runs: on loopback, or where the bind shim cannot be built,
    on every interface after one warning line on stderr (once per process)."""
    try:
        return LocalWorker(**kwargs)
    except bind.ShimBuildError as error:
        if not _fallback_warned:
            _fallback_warned.append(True)
            print(f"fedmnist: warning: TFF workers listen on all interfaces, not {LOOPBACK} ({error}); "
                  "install a C compiler (e.g. gcc) to keep them on loopback", file=sys.stderr, flush=True)
        return LocalWorker(host="0.0.0.0", **kwargs)


@contextlib.contextmanager
def local_runtime(log_path: Path | None = None, num_workers: int = 1,
                  addresses: Sequence[str] = ()) -> Iterator[list[LocalWorker]]:
    """Makes TFF's default context run on workers, and stops the workers it started on the way out.

    With `addresses` it connects to those running workers (`python -m fedmnist.worker`); otherwise
    it starts `num_workers` local ones on loopback and yields them. The previous default context is restored.
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
                workers.append(loopback_worker(log_path=log_path))
            stubs = [w.connect(wait=False) for w in workers]
            readies = [_ready_once(stub, w) for stub, w in zip(stubs, workers)]
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
            self.worker = loopback_worker()
            self.stub = self.worker.connect()
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
