"""Watching workers, so that a dead or silent worker is reported within seconds instead of waited on.

TFF retries a failed gRPC call forever (UNAVAILABLE counts as retryable), and a call to a worker that
stops answering never returns: a killed `worker_binary` would hang the run. So every worker a run
talks to gets a `WorkerWatch`, a thread that

- notices at once when a worker this package started exits (its process is a child of ours), and
- checks every `interval` seconds that the worker completes a fresh gRPC handshake. A busy worker
  does (gRPC answers on its own threads while the clients train); a stopped, hung or vanished one
  does not. Progress is "the worker answers", never "the round is short", so a long round does not
  trip it; `timeout` seconds without an answer do.

A lost worker's watch closes the channel the run's calls use, which ends any call in flight, and
`WatchedStub` turns that failure, and every later call, into `WorkerLostError`, which TFF does not
retry: it reaches the round loop, which restarts local workers or stops the run with one line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import tensorflow_federated as tff

GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
GRPC_OPTIONS = [
    ("grpc.max_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
]


class WorkerLostError(RuntimeError):
    """A worker died or stopped answering; `restartable` when it is a worker this package started and
    it died (a silent one is left to the user: something on the machine stops it)."""

    def __init__(self, name: str, address: str, cause: str, restartable: bool):
        super().__init__(f"{name} at {address} {cause}")
        self.name, self.address, self.cause, self.restartable = name, address, cause, restartable


def exit_cause(returncode: int) -> str:
    return f"died (signal {-returncode})" if returncode < 0 else f"exited with code {returncode}"


class WorkerWatch:
    """The run's channel to one worker, and a thread that declares the worker lost when it dies or
    stays silent for `timeout` seconds. `process` returns the worker's process when this package
    started it (None for a remote worker)."""

    def __init__(self, name: str, address: str, process: Callable[[], object] | None = None,
                 timeout: float = 20.0, interval: float = 1.0):
        self.name, self.address, self.timeout, self.interval = name, address, timeout, interval
        self._process = process
        self.channel = grpc.insecure_channel(address, GRPC_OPTIONS)
        self.stub = WatchedStub(tff.framework.RemoteExecutorGrpcStub(self.channel), self)
        self.lost: WorkerLostError | None = None
        self.last_answer = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch {name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        # Until the worker has answered once, starting it is `wait_until_ready`'s business (it has its
        # own deadline, and starts a worker that aborted while starting once more).
        while not self._stopped.wait(self.interval) and not self.stub.is_ready:
            self.last_answer = time.monotonic()
        while not self._stopped.wait(self.interval):
            if self.check_process():
                return
            if self._answers():
                self.last_answer = time.monotonic()
            elif self.silent_for() > self.timeout:
                self._declare(f"did not answer for {self.timeout:g} s (worker_timeout_seconds)", restartable=False)
                return

    def _answers(self) -> bool:
        probe = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(probe).result(timeout=max(self.interval, 2.0))
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            probe.close()

    def check_process(self) -> bool:
        """Declares the worker lost if its process has exited; True when lost."""
        process = self._process() if self._process else None
        if process is not None and process.poll() is not None and not self._stopped.is_set():
            self._declare(exit_cause(process.returncode), restartable=True)
        return self.lost is not None

    def _declare(self, cause: str, restartable: bool) -> None:
        if self.lost is None:
            self.lost = WorkerLostError(self.name, self.address, cause, restartable)
            self.channel.close()  # ends the calls in flight

    def silent_for(self) -> float:
        return time.monotonic() - self.last_answer

    @property
    def stopping(self) -> bool:
        """The worker is being stopped on purpose: its silence is not a stall."""
        return self._stopped.is_set()

    def stop(self) -> None:
        """Stops watching (the worker is being stopped on purpose) and closes the channel."""
        self._stopped.set()
        self.channel.close()


class WatchedStub(tff.framework.RemoteExecutorStub):
    """TFF's gRPC stub for one worker, raising `WorkerLostError` once its watch says it is lost."""

    def __init__(self, stub: tff.framework.RemoteExecutorGrpcStub, watch: WorkerWatch):
        self._stub, self._watch = stub, watch

    def _call(self, method: str, request):
        if self._watch.lost is not None:
            raise self._watch.lost
        try:
            return getattr(self._stub, method)(request)
        except Exception:
            if self._watch.check_process():
                raise self._watch.lost from None
            raise

    def _dispose(self, method: str, request):
        # A lost worker has nothing left to free (and TFF disposes from finalizers, where raising is noise).
        if self._watch.lost is not None:
            return None
        return getattr(self._stub, method)(request)

    def get_executor(self, request):
        return self._call("get_executor", request)

    def create_value(self, request):
        return self._call("create_value", request)

    def create_struct(self, request):
        return self._call("create_struct", request)

    def create_call(self, request):
        return self._call("create_call", request)

    def create_selection(self, request):
        return self._call("create_selection", request)

    def compute(self, request):
        return self._call("compute", request)

    def dispose(self, request):
        return self._dispose("dispose", request)

    def dispose_executor(self, request):
        return self._dispose("dispose_executor", request)

    @property
    def is_ready(self) -> bool:
        return self._stub.is_ready
