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
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import tensorflow_federated as tff

from fedmnist.runtime.workers import LocalWorker, connect, loopback_worker, release_large_buffers


def _remote_executor(stub: tff.framework.RemoteExecutorGrpcStub, cardinalities,
                     default_num_clients: int = 0) -> tff.framework.RemoteExecutor:
    cardinalities.setdefault(tff.CLIENTS, default_num_clients)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor


def executor_factory(stub: tff.framework.RemoteExecutorGrpcStub, ready: Callable[[], None] | None = None,
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
    return tff.framework.SyncExecutionContext(**_context_kwargs(executor_factory(stub, ready)))


def async_execution_context(stub: tff.framework.RemoteExecutorGrpcStub,
                            ready: Callable[[], None] | None = None) -> tff.framework.AsyncExecutionContext:
    return tff.framework.AsyncExecutionContext(**_context_kwargs(executor_factory(stub, ready)))


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


class OnDemandRuntime:
    """TFF's default context, backed by one LocalWorker started the first time TFF needs an executor
    (and again if it died). `close()` stops the worker and restores the context it replaced."""

    def __init__(self):
        self.worker: LocalWorker | None = None
        self.stub: tff.framework.RemoteExecutorGrpcStub | None = None
        self._context_stack = tff.framework.get_context_stack()
        self._previous = self._context_stack.current
        factory = tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=self._stack_fn)
        self._context_stack.set_default_context(tff.framework.SyncExecutionContext(**_context_kwargs(factory)))
        # Collect TFF's replaced context now: left to interpreter shutdown, its finalizer fails noisily.
        gc.collect()
        atexit.register(self.close)

    def _stack_fn(self, cardinalities):
        if self.worker is None or self.worker.process.poll() is not None:
            self.worker = loopback_worker()
            self.stub = self.worker.connect()
        return _remote_executor(self.stub, cardinalities)

    def close(self) -> None:
        self._context_stack.set_default_context(self._previous)
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        atexit.unregister(self.close)
        if self in _installed:
            _installed.remove(self)


_installed: list[OnDemandRuntime] = []


def install() -> OnDemandRuntime:
    """Makes TFF's default context one whose worker this package owns (started on first use), once per
    process: TFF's own default would start a worker that outlives Python."""
    if not _installed:
        _installed.append(OnDemandRuntime())
    return _installed[0]
