"""The TFF runtime the package owns (fedmnist.runtime): the installed on-demand default context, the
interactive runtime for notebooks, several local workers, and a worker that cannot be reached."""

from __future__ import annotations

import portpicker
import pytest
import tensorflow_federated as tff

from fedmnist import config as config_lib
from fedmnist import runtime
from helpers import LOOPBACK_IPS, assert_same_rounds, listening_ips, logged_workers, process_alive, small_config, small_run


def hello() -> bytes:
    return tff.federated_computation(lambda: "Hello, World!")()


def test_installed_runtime_starts_its_worker_on_first_use_and_close_stops_it(package_runtime):
    assert package_runtime is not None and runtime.install() is package_runtime  # once per process
    context_stack = tff.framework.get_context_stack()
    installed_context = context_stack.current
    assert hello() == b"Hello, World!"
    worker = package_runtime.worker
    assert worker is not None and worker.process.pid in runtime.worker_children()
    assert listening_ips(worker.process.pid) <= LOOPBACK_IPS
    assert hello() == b"Hello, World!" and package_runtime.worker is worker  # the same worker serves again
    with runtime.local_runtime():  # a run's own runtime, then the installed context again
        assert context_stack.current is not installed_context
    assert context_stack.current is installed_context
    try:
        package_runtime.close()
        assert not process_alive(worker.process.pid)
        assert context_stack.current is not installed_context
        assert worker.process.pid not in runtime.worker_children()
    finally:
        again = runtime.install()  # for the rest of the session (conftest closes it)
    assert again is not package_runtime and context_stack.current is not installed_context
    assert hello() == b"Hello, World!" and again.worker.process.pid != worker.process.pid
    again.close()  # no worker of this test outlives it; the next install() starts none until used
    assert runtime.install().worker is None


def test_interactive_runtime_serves_until_closed_and_restores_the_context():
    context_stack = tff.framework.get_context_stack()
    previous = context_stack.current
    others = set(runtime.worker_children())  # workers of other tests in this session
    session = runtime.start_local_runtime()
    try:
        assert context_stack.current is not previous
        # The worker is started through a fresh interpreter that then execs `worker_binary`, and waited for on
        # first use: only then is it sure to be one (listed too early on a busy machine, it was not yet).
        assert hello() == b"Hello, World!"
        [worker] = set(runtime.worker_children()) - others
        assert hello() == b"Hello, World!"
        assert set(runtime.worker_children()) - others == {worker}  # the same worker serves later calls
    finally:
        session.close()
    assert set(runtime.worker_children()) == others
    assert context_stack.current is previous
    session.close()  # closing twice is harmless (it also runs at interpreter exit)


def test_two_local_workers_give_the_same_rounds(prepared_run, tmp_path):
    two = small_run(small_config("num_workers=2"), tmp_path)
    # The two workers' partial sums are merged, so float32 sums are grouped differently.
    assert_same_rounds(prepared_run, two, tolerance=1e-6)
    workers = logged_workers(tmp_path)
    assert len(workers) == 2 and not any(worker.alive() for worker in workers)


def test_unreachable_worker_is_a_runtime_error():
    port = portpicker.pick_unused_port()
    config_lib.check_address("workers[0]", f"localhost:{port}")  # a well-formed address
    before = runtime.worker_children()
    with pytest.raises(runtime.RuntimeStartError, match=f"localhost:{port} did not answer within 1 s"):
        with runtime.local_runtime(addresses=[f"localhost:{port}"], timeout=1.0):
            pass
    assert runtime.worker_children() == before
