"""Fixtures shared by the test modules: the session's TFF runtime, background work, the run several
modules compare against, and a second "host" in network namespaces.

Helpers live in helpers.py. This file imports neither TensorFlow nor TFF (nor fedmnist modules that
do): `uv run pytest -m unit` loads them only through the test modules that need them.
"""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(scope="session", autouse=True)
def package_runtime():
    """TFF's default context on a worker this package owns (`fedmnist.runtime.install()`), so that a TFF
    computation run outside a `local_runtime()` never starts TFF's own worker, which would outlive the
    session; the worker is stopped when the session ends.

    Only when TFF is loaded: test modules are imported at collection, before any fixture runs, so by
    now every module that uses TFF has imported it.
    """
    if "tensorflow_federated" not in sys.modules:
        yield None
        return
    from fedmnist import runtime

    installed = runtime.install()
    try:
        yield installed
    finally:
        installed.close()
        runtime.install().close()  # the one installed now, if a test closed the first and installed another


@pytest.fixture(scope="session", autouse=True)
def background_work(request, tmp_path_factory):
    """Starts, as the session begins, the background work of every fixture that a selected test uses
    (a test module's `BACKGROUND`: fixture name -> a helpers.Background, or a tuple of them for a
    parametrized fixture), so that the processes it drives (a CLI, a notebook's kernel) run while
    other tests run in this process. Ends it with the session: work not started is dropped, running
    work gives up its waits and stops its processes, and what no test took is cleaned up."""
    scheduled = []
    for item in request.session.items:
        for name, works in getattr(getattr(item, "module", None), "BACKGROUND", {}).items():
            for work in works if isinstance(works, tuple) else (works,):
                if name in item.fixturenames and work not in scheduled:
                    work.schedule(tmp_path_factory)
                    scheduled.append(work)
    yield
    if scheduled:
        type(scheduled[0]).end_session()


@pytest.fixture(autouse=True)
def unit_tests_start_no_worker(request):
    """A test marked `unit` that starts a TFF worker fails: it belongs to the slower tier."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    from fedmnist.runtime.processes import worker_children  # no TensorFlow

    before = set(worker_children())
    yield
    assert set(worker_children()) <= before, "a test marked unit started a TFF worker"


@pytest.fixture(scope="module")
def tff_runtime():
    """TFF's execution context backed by a worker this fixture starts, and stops after the module's tests."""
    from fedmnist import runtime

    with runtime.local_runtime() as workers:
        yield workers


@pytest.fixture
def namespaces():
    """A second "host": two network namespaces joined by a veth pair (tests/netns.py), deleted after the
    test; the test is skipped, with the reason, where they cannot be made."""
    import netns

    with netns.made() as made:
        yield made


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory) -> list[dict]:
    """The rounds of a small run on prepared client tensors (helpers.SMALL): the reference that the
    datasets path, several workers, a remote worker and the benchmark's floor must reproduce."""
    from helpers import small_config, small_run

    return small_run(small_config("client_input=prepared"), tmp_path_factory.mktemp("prepared"))
