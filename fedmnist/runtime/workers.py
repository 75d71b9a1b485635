"""TFF's `worker_binary`, as a process this package starts, owns and stops.

TFF's own default context launches `worker_binary` lazily, hands it the parent's stdout and never
stops it (so `python -m fedmnist.train | tail` would hang). `LocalWorker` starts it instead: its
output goes to a log file (or nowhere), the kernel kills it when the parent dies, even by SIGKILL
(`PR_SET_PDEATHSIG`), and `stop()` ends it explicitly.

Workers speak unauthenticated gRPC, so they listen on loopback (127.0.0.1) unless a `host` is given
explicitly. `worker_binary` itself can only listen on every interface; `fedmnist.runtime.bind` preloads
a small shim into it that turns that wildcard bind into a bind to the chosen address, compiling it with
the C compiler on first use. Where no compiler is available, the workers this package starts for its
own runs still start, on all interfaces, after one warning line on stderr (`loopback_worker`); a
worker asked explicitly for one address (`python -m fedmnist.worker --host H`) does not start at all.
"""

from __future__ import annotations

import atexit
import ctypes
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import portpicker
import psutil
import tensorflow_federated as tff

from fedmnist.runtime import bind
from fedmnist.runtime.processes import die_with_parent
from fedmnist.runtime.watch import GRPC_OPTIONS

STARTUP_TIMEOUT_SECONDS = 60.0
# The worker deserializes every client's data every round into buffers larger than this threshold.
# glibc keeps such freed buffers in its heap, fragmented, and the worker's RSS grows round after round;
# served by mmap instead, they go back to the system when freed (docs/performance.md, "Memory", with
# the buffers' sizes).
_MMAP_THRESHOLD_BYTES = 128 * 1024
# One thread per TensorFlow op: the worker already trains a round's clients in parallel, one per core,
# so splitting each op across cores only adds contention, and it makes float32 sums depend on the
# thread split. With it a round is faster and its numbers do not depend on the core count
# (docs/performance.md, "Threads"). The environment wins: set TF_NUM_INTRAOP_THREADS to change it.
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
                                   env=self._env, preexec_fn=die_with_parent)
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
            # poller; how rarely: docs/measurements.md, "Worker start aborts"). A second start has
            # always worked.
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

    def stop(self, force: bool = False) -> None:
        """Stops the worker: SIGINT, then SIGKILL after 5 s; SIGKILL at once with `force` (a worker
        that does not answer, e.g. a stopped process, would not handle SIGINT)."""
        if force and self.process.poll() is None:
            self.process.kill()
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
    stub = tff.framework.RemoteExecutorGrpcStub(grpc.insecure_channel(address, GRPC_OPTIONS))
    if wait:
        wait_until_ready(stub, address, process)
    return stub


def wait_until_ready(stub: tff.framework.RemoteExecutorStub, address: str,
                     process: subprocess.Popen | None = None, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not stub.is_ready:
        if process is not None and process.poll() is not None:
            raise RuntimeStartError(f"TFF worker at {address} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeStartError(f"TFF worker at {address} did not answer within {timeout:g} s")
        time.sleep(0.05)


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


