"""Workers listen on loopback: the bind shim (fedmnist.runtime.bind), the workers the package starts
(fedmnist.runtime.workers), and what happens without a C compiler."""

from __future__ import annotations

import pytest
import tensorflow_federated as tff

from fedmnist import runtime
from fedmnist.runtime import bind, workers
from helpers import LOOPBACK_IPS, WILDCARD_IPS, listening_ips, run_cli


def hello() -> bytes:
    return tff.federated_computation(lambda: "Hello, World!")()


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A C compiler that does not exist and an empty cache: the shim cannot be built."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(workers, "_fallback_warned", [])


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
    monkeypatch.setattr(bind, "child_env", lambda host: {})  # as if LD_PRELOAD were ignored
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


def test_without_a_compiler_package_workers_fall_back_with_one_warning(no_compiler, capsys):
    with runtime.local_runtime(num_workers=2) as workers:
        assert hello() == b"Hello, World!"
        for worker in workers:
            assert listening_ips(worker.process.pid) <= WILDCARD_IPS
    with runtime.local_runtime():
        assert hello() == b"Hello, World!"
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "all interfaces" in line and "no C compiler" in line and "install a C compiler" in line


def test_a_worker_that_aborts_while_starting_is_started_once_more(monkeypatch, tmp_path):
    # As worker_binary's gRPC rarely does: SIGABRT before it serves. The second start serves.
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
