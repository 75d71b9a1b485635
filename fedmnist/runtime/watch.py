"""Watching workers, so that a dead or silent worker is reported within seconds instead of waited on.

TFF retries a failed gRPC call forever (UNAVAILABLE counts as retryable), and a call to a worker that
stops answering never returns: a killed `worker_binary` would hang the run. So every worker a run
talks to gets a `WorkerWatch`, a thread that

- notices at once when a worker this package started exits (its process is a child of ours), and
- checks every `interval` seconds that the worker answers a call (to a method it does not serve, so
  its answer is UNIMPLEMENTED) on a connection of its own, within a deadline. A busy worker does
  (gRPC answers on its own threads while the clients train); a stopped, hung or vanished one does not,
  nor one behind a route that drops packets.
  Progress is "the worker answers", never "the round is short", so a long round does not trip it;
  `timeout` seconds without an answer do, and the probes' deadlines are cut so that the verdict comes
  `timeout` seconds after the last answer, not later.

A lost worker's watch closes the channel the run's calls use, which ends any call in flight, and
`WatchedStub` turns that failure, and every later call, into `WorkerLostError`, which TFF does not
retry: it reaches the round loop, which restarts local workers or stops the run with one line. So
every call has a deadline: the watch's verdict. The calls TFF makes from finalizers, which may run in
any thread (the watch's own included) and where an exception is swallowed, never wait: disposals are
sent without waiting for the answer, and an executor's disposal waits at most `timeout` seconds.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import grpc
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc

from fedmnist.runtime import bind
from fedmnist.runtime.channels import PROBE_OPTIONS, PROBE_SECONDS, ChannelReadiness, answers_on, open_channel

STARTUP_SECONDS = 60.0  # the longest a watch treats a silent worker as one still starting
CLOSE_SECONDS = 5.0  # the longest a channel's close is waited for
PAUSE_SECONDS = 5.0  # a watch pass this late (beyond its interval and probe) means the process was paused
# TFF's stub methods and the gRPC methods they call; the codes TFF's own stub makes retryable.
RPC_NAMES = {"get_executor": "GetExecutor", "create_value": "CreateValue", "create_struct": "CreateStruct",
             "create_call": "CreateCall", "create_selection": "CreateSelection", "compute": "Compute"}
RETRYABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION}


class RetryableCallError(tff.framework.RetryableError):
    """A call that failed in a way TFF retries (the worker's answer was UNAVAILABLE or FAILED_PRECONDITION)."""


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a `host:port` address (IPv6 hosts in brackets); None for others (`unix:PATH`)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or address.startswith("unix:"):
        return None
    return host.strip("[]"), int(port)


def foreign_listeners(address: str) -> set[int]:
    """For a loopback `host:port`: the other users (uids) whose sockets listen there. A worker of another
    user would receive the run's data and choose what the run gets back."""
    parts = split_address(address)
    if parts is None or not bind.is_loopback(parts[0]):
        return set()
    return bind.listener_owners(*parts) - {os.geteuid()}


def answers(address: str, deadline: float, credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Whether the gRPC server at `address` answers a call within `deadline` seconds, on a new connection."""
    probe = open_channel(address, credentials, PROBE_OPTIONS)
    try:
        return answers_on(probe, deadline)
    finally:
        close_channel(probe)


def close_channel(channel: grpc.Channel, wait: float = CLOSE_SECONDS) -> None:
    """Closes `channel`, waiting for gRPC at most `wait` seconds: a close that raced another thread's
    call on a channel to a black-holed worker was seen to block for good, and a run that cannot close a
    channel must still end."""
    closing = threading.Thread(target=channel.close, name="close a channel", daemon=True)
    closing.start()
    closing.join(wait)


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
    started it (None for a remote worker). `credentials` for a worker that serves TLS. A worker starting
    may stay silent for `startup` seconds (its starter has its own deadline). A worker on a loopback
    address that another user's socket listens on is lost at once (`foreign_listeners`)."""

    def __init__(self, name: str, address: str, process: Callable[[], object] | None = None,
                 timeout: float = 20.0, interval: float = 1.0, credentials: grpc.ChannelCredentials | None = None,
                 startup: float = STARTUP_SECONDS):
        self.name, self.address, self.timeout, self.interval = name, address, timeout, interval
        self.credentials, self.startup = credentials, startup
        self._process = process
        self.channel = open_channel(address, credentials)
        self.stub = WatchedStub(self)
        self.lost: WorkerLostError | None = None
        self.last_answer = self.last_tick = time.monotonic()
        self._stopped = threading.Event()
        self._closing, self._closed = threading.Lock(), False
        self._thread = threading.Thread(target=self._watch, name=f"watch {name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            self._watch_until_lost()
        except BaseException as error:  # a watch that cannot watch must not leave the run's calls unguarded
            self._declare(f"could not be watched ({error!r})", restartable=False)
            raise

    def _watch_until_lost(self) -> None:
        # Until the worker has answered once, starting it is `wait_until_ready`'s business (it has its
        # own deadline, and starts a worker that aborted while starting once more); past `startup`
        # seconds, silence counts.
        starting_until = time.monotonic() + self.startup
        while (not self._stopped.wait(self.interval) and not self.stub.is_ready
               and time.monotonic() < starting_until):
            self.last_answer = self.last_tick = time.monotonic()
        while not self._stopped.is_set():
            self._tick()
            if self.check_process():
                return
            foreign = foreign_listeners(self.address) if self._process is None else set()
            if foreign:
                self._declare(f"is served by another user (uid {min(foreign)}) now", restartable=False)
                return
            if self._answers(max(0.1, min(PROBE_SECONDS, self.remaining()))):
                self.last_answer = time.monotonic()
            else:
                self._tick()  # a pause during the probe ends it at once, and is no silence either
                if self.remaining() <= 0:
                    self._declare(f"did not answer for {self.timeout:g} s (worker_timeout_seconds)",
                                  restartable=False)
                    return
            self._stopped.wait(max(0.0, min(self.interval, self.remaining())))

    def _tick(self) -> None:
        """Marks a pass of the watch. A gap of many intervals since the last one means this process did not
        run (stopped with SIGSTOP, a suspended machine): the worker's silence across it says nothing, so
        the worker gets a whole timeout from now."""
        now = time.monotonic()
        if now - self.last_tick > self.interval + PROBE_SECONDS + PAUSE_SECONDS:
            self.last_answer = now
        self.last_tick = now

    def overdue(self) -> bool:
        """Lost, or silent past the timeout with the watch's thread gone: the verdict, declared here. A caller
        waiting on the worker waits no longer than this. While the thread lives the verdict is its own (a
        caller cannot tell a silent worker from a paused process, and the thread can: `_tick`)."""
        if self.lost is None and not self._stopped.is_set() and not self._thread.is_alive() and self.remaining() < 0:
            self._declare(f"did not answer for {self.timeout:g} s (worker_timeout_seconds)", restartable=False)
        return self.lost is not None

    def remaining(self) -> float:
        """Seconds until the worker is lost if it stays silent."""
        return self.timeout - self.silent_for()

    def _answers(self, deadline: float) -> bool:
        return answers(self.address, deadline, self.credentials)

    def check_process(self) -> bool:
        """Declares the worker lost if its process has exited; True when lost."""
        process = self._process() if self._process else None
        if process is not None and process.poll() is not None and not self._stopped.is_set():
            self._declare(exit_cause(process.returncode), restartable=True)
        return self.lost is not None

    def _declare(self, cause: str, restartable: bool) -> None:
        if self.lost is None:
            self.lost = WorkerLostError(self.name, self.address, cause, restartable)
            self._close()  # ends the calls in flight

    def silent_for(self) -> float:
        return time.monotonic() - self.last_answer

    @property
    def stopping(self) -> bool:
        """The worker is being stopped on purpose: its silence is not a stall."""
        return self._stopped.is_set()

    def stop(self) -> None:
        """Stops watching (the worker is being stopped on purpose) and closes the channel."""
        self._stopped.set()
        self._close()

    def _close(self) -> None:
        with self._closing:
            closed, self._closed = self._closed, True
        if not closed:
            close_channel(self.channel)


class WatchedStub(tff.framework.RemoteExecutorStub):
    """TFF's executor service on one worker's channel, raising `WorkerLostError` once its watch says the
    worker is lost. Not TFF's `RemoteExecutorGrpcStub`: its readiness subscribes to the channel
    (`channels.answers_on` says why that is avoided)."""

    def __init__(self, watch: WorkerWatch):
        self._watch = watch
        self._readiness = ChannelReadiness(watch.channel)
        self._raw = executor_pb2_grpc.ExecutorGroupStub(watch.channel)
        self._disposals: set[grpc.Future] = set()  # held until answered: gRPC cancels a call whose future is collected
        self._lock = threading.Lock()

    def _call(self, method: str, request):
        # A worker this package started is called only while its process lives: once it has died, its
        # port is free, and whatever listens there next must not receive the run's calls.
        if self._watch.check_process():
            raise self._watch.lost
        try:
            call = getattr(self._raw, RPC_NAMES[method]).future(request)
        except ValueError:  # the watch closed the channel: the worker is lost
            raise self._watch.lost or WorkerLostError(self._watch.name, self._watch.address, "was stopped",
                                                      restartable=False) from None
        # The call is awaited in slices, so that the watch's verdict ends the wait whatever gRPC does with
        # the call (closing its channel is meant to, and is not relied on).
        while True:
            try:
                return call.result(timeout=self._watch.interval)
            except grpc.FutureTimeoutError:
                if self._watch.overdue():
                    call.cancel()
                    raise self._watch.lost from None
            except (grpc.RpcError, grpc.FutureCancelledError) as error:
                if self._watch.check_process() or self._watch.overdue():
                    raise self._watch.lost from None
                if isinstance(error, grpc.Call) and error.code() in RETRYABLE_CODES:
                    raise RetryableCallError(str(error)) from error  # TFF retries these, as its own stub's
                raise

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
        """Sent, not waited for: TFF disposes from finalizers, which may run in any thread (this worker's
        watch included) at any time, and must never wait on a worker that may not answer."""
        if self._watch.check_process():
            return executor_pb2.DisposeResponse()
        try:
            future = self._raw.Dispose.future(request, timeout=self._watch.timeout)
        except Exception:  # noqa: BLE001 - a closed channel: nothing left to free
            return executor_pb2.DisposeResponse()
        with self._lock:
            self._disposals.add(future)
        future.add_done_callback(self._disposed)
        return executor_pb2.DisposeResponse()

    def _disposed(self, future: grpc.Future) -> None:
        with self._lock:
            self._disposals.discard(future)

    def dispose_executor(self, request):
        """Waits at most the worker timeout; a worker that cannot be reached has nothing left to free."""
        if self._watch.check_process():
            return executor_pb2.DisposeExecutorResponse()
        try:
            return self._raw.DisposeExecutor(request, timeout=self._watch.timeout)
        except Exception:  # noqa: BLE001 - as above; TFF ignores the answer
            return executor_pb2.DisposeExecutorResponse()

    @property
    def is_ready(self) -> bool:
        """The worker has answered (asked again until it has)."""
        return self._readiness.is_ready
