"""TFF's `worker_binary`, as a process this package starts, owns and stops.

TFF's own default context launches `worker_binary` lazily, hands it the parent's stdout and never
stops it (so `python -m fedmnist.train | tail` would hang). `LocalWorker` starts it instead: its
output goes to a log file (or nowhere), the kernel kills it when the parent dies, even by SIGKILL
(`PR_SET_PDEATHSIG`), and `stop()` ends it explicitly.

A worker runs whatever computation it is sent, as the user who started it, and speaks unauthenticated
gRPC. So the workers this package starts for its runs listen on loopback (127.0.0.1) and read only
from connections made by their own user's processes: the shim `fedmnist.runtime.bind` preloads into
`worker_binary` (which itself can only listen on every interface and serves anyone) keeps the bind to
loopback and closes every other user's connection before the worker reads from it (docs/security.md).
It is compiled with the C compiler on first use; without one, a run's workers do not start
(`RuntimeStartError`, one line). `python -m fedmnist.worker` chooses its own mode (`fedmnist.runtime.worker`).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import ipaddress
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import portpicker
import psutil

from fedmnist.errors import RuntimeStartError
from fedmnist.runtime import bind
from fedmnist.runtime.channels import ChannelReadiness, open_channel
from fedmnist.runtime.processes import dying_with_parent

if TYPE_CHECKING:
    import tensorflow_federated as tff

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

# The workers a run starts accept only their own user's connections. Only tests/test_worker_security.py
# turns this off, to show the attack it prevents: another local user running code in the run's worker.
ACCEPT_ONLY_OWN_USER = True


def worker_binary_path() -> Path:
    """TFF's `worker_binary`, found without importing TFF (which imports TensorFlow)."""
    return Path(importlib.util.find_spec("tensorflow_federated").origin).parent / "data" / "worker_binary"


def _unmapped(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, with an IPv4 address in its IPv6 form (::ffff:a.b.c.d) as plain IPv4."""
    address = ipaddress.ip_address(ip)
    return getattr(address, "ipv4_mapped", None) or address


class LocalWorker:
    """One `worker_binary` child process serving TFF's executor service.

    Where: on `host` at `port` (loopback by default; `0.0.0.0` or `::` means every interface), or, with
    `socket_dir` (a directory only this user can enter), on the Unix socket `socket_dir/worker.sock` and
    no TCP port at all. Whom: with `only_user` (the default) it reads only from connections made by
    sockets of this process's user, which needs loopback or the Unix socket; without, from anyone who can
    reach it. Raises `bind.ShimBuildError` when the shim that does this cannot be built or cannot work.
    """

    def __init__(self, port: int | None = None, max_concurrent_computation_calls: int = -1,
                 log_path: Path | None = None, host: str = LOOPBACK, only_user: bool = True,
                 socket_dir: Path | None = None):
        self.host = str(ipaddress.ip_address(host))
        self.only_user = only_user
        self.socket_path = str(Path(socket_dir) / "worker.sock") if socket_dir is not None else None
        if only_user and self.socket_path is None and not bind.is_loopback(self.host):
            raise ValueError(f"a worker on {self.host} cannot tell its own user's connections from others'; "
                             "only one on loopback or a Unix socket can")
        self.port = port or portpicker.pick_unused_port()
        binary = worker_binary_path()
        if not binary.is_file():
            raise RuntimeStartError(f"TFF worker binary not found at {binary.name}; reinstall tensorflow-federated")
        self._args = [str(binary), f"--port={self.port}",
                      f"--max_concurrent_computation_calls={max_concurrent_computation_calls}"]
        if only_user and self.socket_path is None:
            bind.check_owner_lookup()
        inherited = {key: value for key, value in os.environ.items()
                     if key not in (bind.ADDRESS_VARIABLE, bind.SOCKET_VARIABLE, bind.PEER_VARIABLE)}
        self._env = _WORKER_ENV | inherited | bind.child_env(
            self.host, socket_path=self.socket_path, peer_uid=os.geteuid() if only_user else None)
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.process = self._spawn()
        atexit.register(self.stop)

    def _spawn(self) -> subprocess.Popen:
        if self.socket_path is not None and os.path.lexists(self.socket_path):
            os.unlink(self.socket_path)  # a previous start's socket: bind would fail on it
        # A process group of its own: a terminal's Ctrl-C goes to the whole foreground group, and the worker
        # must hear about a stop from us (which stops it), not from the terminal, mid-round.
        process = subprocess.Popen(dying_with_parent(self._args), stdin=subprocess.DEVNULL, stdout=self._log,
                                   stderr=self._log, env=self._env, process_group=0)
        if hasattr(self._log, "write"):
            where = f"socket {self.socket_path}" if self.socket_path else f"host {self.host}"
            self._log.write(f"fedmnist: worker_binary pid {process.pid} port {self.port} {where}\n".encode())
            self._log.flush()
        return process

    @property
    def all_interfaces(self) -> bool:
        return self.socket_path is None and bind.is_all_interfaces(self.host)

    @property
    def address(self) -> str:
        """Where to reach it: `unix:PATH`, its host, or loopback for one listening on every interface."""
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        host = LOOPBACK if self.all_interfaces else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def wait_ready(self) -> None:
        """Returns once the worker answers and listens where it should, without TensorFlow (the `fedmnist
        worker` command: it serves the worker, it does not call it)."""
        channel = open_channel(self.address)
        try:
            self.wait_until_ready(ChannelReadiness(channel))
        finally:
            channel.close()

    def connect(self, wait: bool = True) -> tff.framework.RemoteExecutorGrpcStub:
        """A stub for this worker, once it answers and listens where it should (at once with `wait=False`)."""
        stub = connect(self.address, wait=False)
        if wait:
            self.wait_until_ready(stub)
        return stub

    def wait_until_ready(self, stub: tff.framework.RemoteExecutorStub | ChannelReadiness) -> None:
        try:
            wait_until_ready(stub, self.address, self.process)
        except RuntimeStartError:
            if self.process.returncode != -signal.SIGABRT:
                raise
            # Starts ended by SIGABRT were gRPC's fork handlers aborting the fork before exec, which the
            # start no longer does (docs/measurements.md, "Worker start aborts"); a start that aborts
            # anyway gets one more try.
            self.process = self._spawn()
            wait_until_ready(stub, self.address, self.process)
        self.check_listening()

    def listening_sockets(self) -> set[tuple[str, int]]:
        """(IP address, port) of every TCP socket the worker listens on."""
        return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(self.process.pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN}

    def check_listening(self) -> None:
        """Stops the worker and raises RuntimeStartError unless it listens where it should and nowhere else:
        beyond its host or Unix socket, the shim did not take effect; not on its port, the stub reached
        another process that holds the port."""
        listening = self.listening_sockets()
        if self.socket_path is not None:
            stray = {ip for ip, _ in listening}
            expected = "its Unix socket"
        else:
            stray = set() if self.all_interfaces else {
                ip for ip, _ in listening if _unmapped(ip) != _unmapped(self.host)}
            expected = f"{self.host}"
        if stray:
            self.stop()
            raise RuntimeStartError(f"TFF worker on port {self.port} listens on {', '.join(sorted(stray))}, "
                                    f"not only {expected}: the bind shim did not take effect")
        if self.socket_path is None and self.port not in {port for _, port in listening}:
            self.stop()
            raise RuntimeStartError(f"TFF worker does not listen on port {self.port}: another process holds it")

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


def connect(address: str, process: subprocess.Popen | None = None, wait: bool = True,
            credentials: grpc.ChannelCredentials | None = None) -> tff.framework.RemoteExecutorGrpcStub:
    """Returns a stub for the executor service at `address`, once it answers (at once with `wait=False`);
    `credentials` for a worker that serves TLS (`python -m fedmnist.worker --tls`)."""
    import tensorflow_federated as tff  # here, not at the top: the worker command never imports it

    stub = tff.framework.RemoteExecutorGrpcStub(open_channel(address, credentials))
    if wait:
        wait_until_ready(stub, address, process)
    return stub


def wait_until_ready(stub: tff.framework.RemoteExecutorStub | ChannelReadiness, address: str,
                     process: subprocess.Popen | None = None, timeout: float = STARTUP_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not stub.is_ready:
        if process is not None and process.poll() is not None:
            raise RuntimeStartError(f"TFF worker at {address} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeStartError(f"TFF worker at {address} did not answer within {timeout:g} s")
        time.sleep(0.05)


def loopback_worker(**kwargs) -> LocalWorker:
    """A LocalWorker for the package's own runs: on loopback, reading only from this user's connections.
    Raises RuntimeStartError, in one line, where that cannot be done (no C compiler to build the shim)."""
    try:
        return LocalWorker(only_user=ACCEPT_ONLY_OWN_USER, **kwargs)
    except bind.ShimBuildError as error:
        raise RuntimeStartError(f"cannot keep the TFF worker to this user's connections: {error}; install a "
                                "C compiler (e.g. gcc), which fedmnist uses once to build the shim that does "
                                "(docs/security.md)") from None


def private_directory(prefix: str = "fedmnist-worker-") -> Path:
    """A new directory only this user can enter (for a worker's Unix socket), with a path short enough
    for one: in $XDG_RUNTIME_DIR when set (itself private), else the temporary directory, else /tmp."""
    limit = 107 - len("/worker.sock") - len(prefix) - 10  # sun_path holds 107 bytes and a NUL
    for base in (os.environ.get("XDG_RUNTIME_DIR"), None, "/tmp"):
        if base is not None and not os.path.isdir(base):
            continue
        if len(os.path.abspath(base or tempfile.gettempdir())) > limit:
            continue
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))  # mode 0700, owned by this user
        info = path.lstat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeStartError(f"the private directory {path} is not private (mode {info.st_mode & 0o777:o})")
        return path
    raise RuntimeStartError("no temporary directory with a path short enough for a Unix socket; set TMPDIR")
