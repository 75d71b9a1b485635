"""Workers listen on loopback and read only their own user's connections: the bind shim
(fedmnist.runtime.bind, loopback_bind.c), the workers the package starts (fedmnist.runtime.workers),
and what happens without a C compiler. tests/test_worker_security.py attacks them as another user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import portpicker
import pytest
import tensorflow_federated as tff

import other_user
from fedmnist import runtime
from fedmnist.runtime import bind, workers
from helpers import LOOPBACK_IPS, listening_ips, run_cli


def hello() -> bytes:
    return tff.federated_computation(lambda: "Hello, World!")()


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A C compiler that does not exist and an empty cache: the shim cannot be built."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_package_started_worker_listens_on_loopback_only():
    with runtime.local_runtime() as [worker]:
        assert hello() == b"Hello, World!"
        assert worker.address == f"127.0.0.1:{worker.port}"
        assert listening_ips(worker.process.pid) <= LOOPBACK_IPS and listening_ips(worker.process.pid)


def test_worker_on_an_ipv6_host_listens_there_only():
    worker = runtime.LocalWorker(host="::1")
    try:
        assert worker.address == f"[::1]:{worker.port}"
        with runtime.local_runtime(addresses=[worker.address]):
            assert hello() == b"Hello, World!"
        assert listening_ips(worker.process.pid) == {"::1"}
    finally:
        worker.stop()


def test_a_worker_the_shim_did_not_reach_is_stopped(monkeypatch):
    monkeypatch.setattr(bind, "child_env", lambda *args, **kwargs: {})  # as if LD_PRELOAD were ignored
    worker = runtime.LocalWorker()
    with pytest.raises(runtime.RuntimeStartError, match="listens on ::, not only 127.0.0.1"):
        worker.connect()
    assert worker.process.poll() is not None


def test_shim_is_built_once_per_source_and_keeps_other_preloads(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    env = bind.child_env("10.0.0.5", {"LD_PRELOAD": "/opt/other.so"})
    shim, other = env["LD_PRELOAD"].split(":")
    assert other == "/opt/other.so" and env[bind.ADDRESS_VARIABLE] == "10.0.0.5"
    assert shim.startswith(str(tmp_path / "fedmnist" / "loopback_bind-")) and shim.endswith(".so")
    built = (tmp_path / "fedmnist").stat().st_mtime_ns, list((tmp_path / "fedmnist").iterdir())
    assert bind.child_env("127.0.0.1", {})["LD_PRELOAD"] == shim
    assert ((tmp_path / "fedmnist").stat().st_mtime_ns, list((tmp_path / "fedmnist").iterdir())) == built
    assert bind.child_env("0.0.0.0") == {} and bind.child_env("::") == {}


def test_a_compile_error_is_a_shim_build_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "cc -Werror=this-is-not-a-warning")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(bind.ShimBuildError, match="failed"):
        bind.shim_path()
    assert list((tmp_path / "fedmnist").iterdir()) == []  # no half-written file left


def test_without_a_compiler_the_worker_command_refuses_in_one_line(no_compiler, tmp_path):
    done = run_cli("--port", "8000", module="fedmnist.worker", cwd=tmp_path)
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert "no C compiler" in line and "install a C compiler" in line and "--host 0.0.0.0" in line


def test_without_a_compiler_a_runs_workers_do_not_start_and_say_why_in_one_line(no_compiler):
    # They used to start on every interface after a warning: open to every local user and the network.
    before = runtime.worker_children()
    with pytest.raises(runtime.RuntimeStartError) as raised:
        with runtime.local_runtime(num_workers=2):
            pass
    [line] = str(raised.value).splitlines()
    assert "no C compiler" in line and "install a C compiler" in line and "this user's connections" in line
    assert runtime.worker_children() == before


def test_a_worker_that_aborts_while_starting_is_started_once_more(monkeypatch, tmp_path):
    # A start that ends by SIGABRT before it serves (docs/measurements.md, "Worker start aborts"): the
    # second start serves.
    aborted = tmp_path / "aborted"
    binary = tmp_path / "worker_binary"
    binary.write_text(f"#!/bin/sh\nif [ ! -e '{aborted}' ]; then touch '{aborted}'; kill -ABRT $$; fi\n"
                      f"exec '{workers.worker_binary_path()}' \"$@\"\n")
    binary.chmod(0o755)
    monkeypatch.setattr(workers, "worker_binary_path", lambda: binary)
    worker = runtime.LocalWorker(log_path=tmp_path / "worker.log")
    first = worker.process
    try:
        worker.connect()
        assert first.returncode == -6 and aborted.exists()
        assert worker.process.poll() is None and listening_ips(worker.process.pid) <= LOOPBACK_IPS
        assert (tmp_path / "worker.log").read_text().count("fedmnist: worker_binary pid") == 2
    finally:
        worker.stop()


def test_a_worker_that_aborts_twice_is_an_error(monkeypatch, tmp_path):
    binary = tmp_path / "worker_binary"
    binary.write_text("#!/bin/sh\nkill -ABRT $$\n")
    binary.chmod(0o755)
    monkeypatch.setattr(workers, "worker_binary_path", lambda: binary)
    worker = runtime.LocalWorker()
    with pytest.raises(runtime.RuntimeStartError, match="exited with code -6"):
        worker.connect()


def test_worker_runs_one_tf_thread_per_op_and_mmaps_large_buffers_unless_the_environment_says_otherwise(
        monkeypatch):
    def worker_environ() -> dict[str, str]:
        worker = runtime.LocalWorker()
        try:
            worker.connect()  # serving, so past exec: /proc shows the binary's own environment
            raw = open(f"/proc/{worker.process.pid}/environ", "rb").read().split(b"\0")
        finally:
            worker.stop()
        return dict(item.decode().split("=", 1) for item in raw if b"=" in item)

    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    environ = worker_environ()
    assert environ["TF_NUM_INTRAOP_THREADS"] == "1" and environ["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "2")
    assert worker_environ()["TF_NUM_INTRAOP_THREADS"] == "2"


# --- The shim on its own: a plain Python server under it, clients of this user and of another -------

SERVER = """
import socket, sys
server = socket.socket(socket.AF_INET6)
server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
server.bind(("::", int(sys.argv[1])))  # the wildcard bind a worker_binary makes
server.listen()
print("listening", flush=True)
while True:
    connection, _ = server.accept()
    connection.sendall(b"served")
    connection.close()
"""

CLIENT = """
import socket, sys
{become}
family, address = sys.argv[1], sys.argv[2]
if family == "unix":
    client = socket.socket(socket.AF_UNIX)
    client.settimeout(10)
    try:
        client.connect(address)
    except PermissionError:
        print("no permission", flush=True)
        sys.exit(0)
else:
    host, port = address.rsplit(":", 1)
    client = socket.socket(socket.AF_INET6 if family == "v6" else socket.AF_INET)
    client.settimeout(10)
    client.connect((host, int(port)))
print(repr(client.recv(16)), flush=True)
"""


@pytest.fixture
def shimmed_server(tmp_path):
    """Starts SERVER under the shim with the given environment; stops it after the test."""
    started = []

    def start(**shim) -> tuple[int, subprocess.Popen]:
        port = portpicker.pick_unused_port()
        env = {**os.environ, **bind.child_env(shim.pop("host", None), **shim)}
        process = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline() == "listening\n", process.stderr.read()
        return port, process

    yield start
    for process in started:
        process.kill()
        process.communicate()


def connect_as(other: bool, family: str, address: str) -> str:
    become = other_user.BECOME_OTHER_USER if other else ""
    done = subprocess.run([sys.executable, "-c", CLIENT.format(become=become), family, address],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_shim_serves_its_own_user_and_closes_another_users_connections_on_loopback(shimmed_server):
    other_user.require_root()
    port, server = shimmed_server(host="127.0.0.1", peer_uid=os.geteuid())
    assert connect_as(False, "v4", f"127.0.0.1:{port}") == "b'served'"
    assert connect_as(False, "v6", f"::ffff:127.0.0.1:{port}") == "b'served'"  # gRPC's dual-stack form
    assert connect_as(True, "v4", f"127.0.0.1:{port}") == "b''"  # closed before a byte was sent
    assert connect_as(True, "v6", f"::ffff:127.0.0.1:{port}") == "b''"
    assert connect_as(False, "v4", f"127.0.0.1:{port}") == "b'served'"  # it goes on serving
    server.kill()
    refusals = server.communicate()[1].splitlines()
    uid = other_user.other_user()[0]
    assert refusals == [f"fedmnist: refused a connection from uid {uid} (only uid {os.geteuid()} may connect)"] * 2


def test_the_shim_checks_ipv6_loopback_peers_too(shimmed_server):
    other_user.require_root()
    port, _ = shimmed_server(host="::1", peer_uid=os.geteuid())
    assert connect_as(False, "v6", f"::1:{port}") == "b'served'"
    assert connect_as(True, "v6", f"::1:{port}") == "b''"


def test_the_shim_serves_a_unix_socket_instead_of_a_port_and_checks_its_peers(shimmed_server):
    other_user.require_root()
    directory = Path(tempfile.mkdtemp(prefix="fedmnist-test-", dir="/tmp"))
    try:
        directory.chmod(0o755)  # open on purpose: the owner check alone must refuse the other user
        path = directory / "worker.sock"
        port, server = shimmed_server(socket_path=str(path), peer_uid=os.geteuid())
        path.chmod(0o777)
        assert not listening_ips(server.pid)  # no TCP port at all
        assert connect_as(False, "unix", str(path)) == "b'served'"
        assert connect_as(True, "unix", str(path)) == "b''"
    finally:
        shutil.rmtree(directory)


def test_a_private_directory_keeps_other_users_from_a_unix_socket(shimmed_server):
    other_user.require_root()
    directory = workers.private_directory()
    try:
        assert directory.stat().st_mode & 0o777 == 0o700
        path = directory / "worker.sock"
        shimmed_server(socket_path=str(path))  # no owner check: the directory alone
        assert connect_as(False, "unix", str(path)) == "b'served'"
        assert connect_as(True, "unix", str(path)) == "no permission"
    finally:
        shutil.rmtree(directory)


def test_an_unusable_peer_rule_refuses_everyone(shimmed_server):
    port, server = shimmed_server(host="127.0.0.1")
    server.kill()
    server.communicate()
    env = {**os.environ, **bind.child_env("127.0.0.1"), bind.PEER_VARIABLE: "not-a-uid"}
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline() == "listening\n"
        assert connect_as(False, "v4", f"127.0.0.1:{port}") == "b''"  # fails closed
    finally:
        process.kill()
        process.communicate()


def test_the_owner_of_a_loopback_connection_is_reported():
    bind.check_owner_lookup()  # this machine answers the shim's question
    import socket

    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.connect(listener.getsockname())
        assert bind.tcp_owner(client.getsockname(), listener.getsockname()) == os.geteuid()
        assert bind.tcp_owner(("127.0.0.1", 1), listener.getsockname()) is None
        assert os.geteuid() in bind.listener_owners("127.0.0.1", listener.getsockname()[1])
        assert bind.listener_owners("127.0.0.1", client.getsockname()[1]) == set()
