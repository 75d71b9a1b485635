"""TFF execution contexts backed by workers this package owns, installed explicitly.

Nothing happens at import. `install()` makes TFF's default context one that starts a `LocalWorker` on
first use (notebooks, library use); `local_runtime()` gives a run its own workers for its duration and
restores the previous context afterwards; `start_local_runtime()` is the same for interactive sessions,
where no `with` block spans cells. The contexts are TFF's own `SyncExecutionContext` speaking gRPC to
the workers, exactly what `tff.backends.native.set_sync_local_cpp_execution_context` builds.

With several workers (local ones the package starts, or `python -m fedmnist.worker` processes named
by address) each round's clients are split across them by TFF's mergeable-computation context
(`tff.backends.native.create_mergeable_comp_execution_context`): every worker trains its share of
the clients and pre-aggregates it, and the partial aggregates are merged.

Workers named by address are reached with mutual TLS when the run has TLS files (`fedmnist.runtime.tls`,
from the environment unless given), else in plain gRPC: then a loopback address must be served by this
user (`watch.foreign_listeners`), and any other gets one warning line (docs/security.md).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import tensorflow_federated as tff

from fedmnist.runtime import bind, tls
from fedmnist.runtime.watch import WorkerWatch, foreign_listeners, split_address
from fedmnist.runtime.workers import (LocalWorker, RuntimeStartError, loopback_worker, release_large_buffers,
                                      wait_until_ready)


def _remote_executor(stub: tff.framework.RemoteExecutorStub, cardinalities,
                     default_num_clients: int = 0) -> tff.framework.RemoteExecutor:
    cardinalities.setdefault(tff.CLIENTS, default_num_clients)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor


def executor_factory(stub: tff.framework.RemoteExecutorStub, ready: Callable[[], None] | None = None,
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


def execution_context(stub: tff.framework.RemoteExecutorStub,
                      ready: Callable[[], None] | None = None) -> tff.framework.SyncExecutionContext:
    return tff.framework.SyncExecutionContext(**_context_kwargs(executor_factory(stub, ready)))


def async_execution_context(stub: tff.framework.RemoteExecutorStub,
                            ready: Callable[[], None] | None = None) -> tff.framework.AsyncExecutionContext:
    return tff.framework.AsyncExecutionContext(**_context_kwargs(executor_factory(stub, ready)))


def multi_worker_context(stubs: list[tff.framework.RemoteExecutorStub],
                         readies: Sequence[Callable[[], None] | None] = ()):
    """One worker: the plain sync context. Several: each round's clients split across them."""
    readies = list(readies) or [None] * len(stubs)
    if len(stubs) == 1:
        return execution_context(stubs[0], readies[0])
    return tff.backends.native.create_mergeable_comp_execution_context(
        [async_execution_context(stub, ready) for stub, ready in zip(stubs, readies)])


def _ready_once(watch: WorkerWatch, worker: LocalWorker) -> Callable[[], None]:
    """Waits for a starting worker on first use, so it boots while the computations are traced. A
    worker that dies while starting is lost like one that dies later."""
    done = []

    def ready() -> None:
        if not done:
            try:
                worker.wait_until_ready(watch.stub)
            except RuntimeStartError:
                if watch.check_process():
                    raise watch.lost from None
                raise
            done.append(True)

    return ready


class Runtime(Sequence):
    """The workers of a run, each watched (`fedmnist.runtime.watch`), serving TFF's default context.

    It is the sequence of the local workers it started (none when it connects to `addresses`).
    `restart()` replaces the local workers after one was lost; remote workers cannot be restarted
    from here.
    """

    def __init__(self, log_path: Path | None = None, num_workers: int = 1, addresses: Sequence[str] = (),
                 timeout: float = 20.0, tls_files: tls.TlsFiles | None = None):
        self.log_path, self.num_workers, self.addresses, self.timeout = log_path, num_workers, list(addresses), timeout
        self.credentials = tls_files.load() if tls_files is not None and self.addresses else None
        self.workers: list[LocalWorker] = []
        self.watches: list[WorkerWatch] = []
        self.restarts = 0

    def start(self) -> None:
        if self.addresses:
            self._check_addresses()
            channel_credentials = self.credentials.channel() if self.credentials else None
            self.watches = [WorkerWatch(f"worker {number}", address, timeout=self.timeout,
                                        credentials=channel_credentials, startup=self.timeout)
                            for number, address in enumerate(self.addresses, start=1)]
            for watch in self.watches:
                try:
                    wait_until_ready(watch.stub, watch.address, timeout=self.timeout)
                except RuntimeStartError:
                    parts = split_address(watch.address)
                    problem = self.credentials.handshake_problem(*parts) if self.credentials and parts else None
                    if problem is None:
                        raise
                    raise RuntimeStartError(f"TFF worker at {watch.address}: {problem}") from None
            readies = []
        else:
            self.workers = [loopback_worker(log_path=self.log_path) for _ in range(self.num_workers)]
            self.watches = [WorkerWatch(f"worker {number}", worker.address, lambda w=worker: w.process, self.timeout)
                            for number, worker in enumerate(self.workers, start=1)]
            readies = [_ready_once(watch, worker) for watch, worker in zip(self.watches, self.workers)]
        tff.framework.get_context_stack().set_default_context(
            multi_worker_context([watch.stub for watch in self.watches], readies))

    def _check_addresses(self) -> None:
        """Refuses a loopback address another user listens on; warns once about plain gRPC off loopback."""
        for address in self.addresses:
            foreign = foreign_listeners(address) if self.credentials is None else set()
            if foreign:
                raise RuntimeStartError(
                    f"TFF worker at {address} is served by another user (uid {min(foreign)}): a worker receives "
                    "the run's data and chooses what it gets back, so fedmnist uses only its own user's")
        plain = [address for address in self.addresses
                 if self.credentials is None and not bind.is_loopback((split_address(address) or ("",))[0])]
        if plain and not _warned_plain:
            _warned_plain.append(True)
            print(f"fedmnist: warning: worker{'s' * (len(plain) > 1)} {', '.join(plain)} reached in plain gRPC, "
                  "unauthenticated and unencrypted; set FEDMNIST_TLS_CA, FEDMNIST_TLS_CERT and FEDMNIST_TLS_KEY "
                  "for workers started with --tls (docs/security.md)", file=sys.stderr, flush=True)

    def restart(self) -> None:
        """Stops every local worker and starts new ones (a round in flight on them is abandoned)."""
        self.stop_workers()
        self.restarts += 1
        self.start()

    def stalled(self) -> bool:
        """True when a worker is lost or has not answered for a few seconds."""
        return any(not watch.stopping
                   and (watch.lost is not None or watch.check_process() or watch.silent_for() > 3.0)
                   for watch in self.watches)

    def stop_workers(self) -> None:
        stalled = [watch.lost is not None or watch.silent_for() > 3.0 for watch in self.watches]
        for watch in self.watches:
            watch.stop()
        for worker, force in zip(self.workers, stalled):
            worker.stop(force=force)

    def __getitem__(self, index):
        return self.workers[index]

    def __len__(self) -> int:
        return len(self.workers)


_active: list[Runtime] = []
_warned_plain: list[bool] = []


def active_runtime() -> Runtime | None:
    """The innermost runtime a `local_runtime` block is running, if any (for signal handlers)."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def local_runtime(log_path: Path | None = None, num_workers: int = 1, addresses: Sequence[str] = (),
                  timeout: float = 20.0, tls_files: tls.TlsFiles | None = None) -> Iterator[Runtime]:
    """Makes TFF's default context run on watched workers, and stops the workers it started on the way out.

    With `addresses` it connects to those running workers (`python -m fedmnist.worker`), failing with
    `RuntimeStartError` when one does not answer within `timeout` seconds; with mutual TLS when
    `tls_files` are given or named in the environment (`tls.from_environment`). Otherwise it starts
    `num_workers` local ones on loopback, which serve this user only. The previous default context is
    restored. Raises `tls.TlsError` for TLS files that cannot be used.
    """
    if tls_files is None and addresses:
        tls_files = tls.from_environment()
    release_large_buffers()
    context_stack = tff.framework.get_context_stack()
    previous = context_stack.current
    runtime = Runtime(log_path, num_workers, addresses, timeout, tls_files)
    _active.append(runtime)
    try:
        runtime.start()
        yield runtime
    finally:
        _active.remove(runtime)
        context_stack.set_default_context(previous)
        runtime.stop_workers()


def start_local_runtime(log_path: Path | None = None) -> contextlib.ExitStack:
    """`local_runtime()` for interactive sessions (notebooks), where no `with` block spans cells.

    The worker serves until `.close()` is called on the returned object, or the interpreter exits
    (and, like every worker here, it dies with its parent process).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(local_runtime(log_path))
    atexit.register(stack.close)
    return stack


class OnDemandRuntime:
    """TFF's default context, backed by one LocalWorker started the first time TFF needs an executor
    (and again if it died). `close()` stops the worker and restores the context it replaced."""

    def __init__(self):
        self.worker: LocalWorker | None = None
        self.watch: WorkerWatch | None = None
        self._context_stack = tff.framework.get_context_stack()
        self._previous = self._context_stack.current
        factory = tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=self._stack_fn)
        self._context_stack.set_default_context(tff.framework.SyncExecutionContext(**_context_kwargs(factory)))
        # Collect TFF's replaced context now: left to interpreter shutdown, its finalizer fails noisily.
        gc.collect()
        # atexit runs last in, first out: `close` first (it restores the context replaced here, TFF's own),
        # then the release. In the other order `close` put TFF's own back after the release, and a process
        # that never closed this runtime printed TFF's finalizer traceback at exit.
        atexit.register(_release_default_context)
        atexit.register(self.close)

    def _stack_fn(self, cardinalities):
        if self.worker is None or self.worker.process.poll() is not None:
            self._stop_worker()
            worker = self.worker = loopback_worker()
            self.watch = WorkerWatch("worker", worker.address, lambda: worker.process)
            worker.wait_until_ready(self.watch.stub)
        return _remote_executor(self.watch.stub, cardinalities)

    def _stop_worker(self) -> None:
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def close(self) -> None:
        self._context_stack.set_default_context(self._previous)
        self._stop_worker()
        atexit.unregister(self.close)
        if self in _installed:
            _installed.remove(self)


_installed: list[OnDemandRuntime] = []


def _release_default_context() -> None:
    """At exit, replaces whatever default context `close()` restored (TFF's own, whose finalizer fails
    noisily when left to interpreter shutdown) by one that starts nothing, and collects it now."""
    def no_worker(cardinalities):
        raise RuntimeError("the Python interpreter is exiting")

    factory = tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=no_worker)
    tff.framework.get_context_stack().set_default_context(tff.framework.SyncExecutionContext(**_context_kwargs(factory)))
    gc.collect()


def install() -> OnDemandRuntime:
    """Makes TFF's default context one whose worker this package owns (started on first use), once per
    process: TFF's own default would start a worker that outlives Python."""
    if not _installed:
        _installed.append(OnDemandRuntime())
    return _installed[0]
