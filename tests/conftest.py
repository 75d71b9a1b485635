"""Fixtures shared by the test modules: the session's TFF runtime, background work, the run several
modules compare against, and a second "host" in network namespaces.

Helpers live in helpers.py. This file imports neither TensorFlow nor TFF (nor fedmnist modules that
do): `uv run pytest -m unit` loads them only through the test modules that need them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest


MODULE_SECONDS = Path(__file__).parent / "module_seconds.json"


def pytest_addoption(parser):
    parser.addoption("--measure-modules", action="store_true",
                     help=f"measure each test module's seconds, its background work included, and write them to "
                          f"tests/{MODULE_SECONDS.name} (the shard plan); a full run measures every module")


def pytest_configure(config):
    """Lets Python cache bytecode in this session and every process it starts (xdist's workers, CLIs,
    kernels), as it does by default: an environment with PYTHONDONTWRITEBYTECODE (common in containers)
    and no cached bytecode would have each of the suite's dozens of Python processes compile TensorFlow
    from source again, about 5 s of CPU apiece (docs/testing.md). A test that needs no writes sets it."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    use_session_temporary_directory(config)


def use_session_temporary_directory(config) -> None:
    """The session's temporary files, and those of every process it starts, go to a directory of its own,
    removed when the session ends. TensorFlow's AutoGraph writes a module to the temporary directory for every
    function it converts and Python caches its bytecode beside it, in `__pycache__`, which nothing removes:
    the suite left about 500 files in /tmp on every run. pytest's own `tmp_path` root stays where it was
    (`PYTEST_DEBUG_TEMPROOT`), so a failed test's files are kept as usual. xdist's workers inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    directory = tempfile.mkdtemp(prefix="fedmnist-tests-")
    # Open to look into (not to write): the tests acting as another user must meet the package's own
    # private directories inside it, not this one.
    os.chmod(directory, 0o755)
    os.environ["TMPDIR"] = tempfile.tempdir = directory
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_collection(session):
    """Collection imports TensorFlow and TFF (test modules import them): as the commands do, with the
    garbage collector paused and their objects frozen out of its passes afterwards (`fedmnist.imports`)."""
    from fedmnist.imports import long_lived_imports

    with long_lived_imports():
        yield
    if "tensorflow_federated" in sys.modules:
        # Now, not only in `package_runtime`: a session that runs no test (`--collect-only`) runs no fixture,
        # and TFF's own default context, frozen and left to interpreter shutdown, printed a traceback at exit.
        from fedmnist import runtime

        runtime.install()


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


def pytest_xdist_auto_num_workers(config) -> int | None:
    """`-n logical` (pyproject's addopts): one shard more than the cores this process may use. A shard's
    process often waits (on a CLI, a kernel, a worker, a signal's effect) with its core idle, and the
    extra shard fills that time (docs/testing.md, "Shards"). PYTEST_XDIST_AUTO_NUM_WORKERS still overrides it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return len(os.sched_getaffinity(0)) + 1


def shard_of(item: pytest.Item) -> str | None:
    """The shard (an xdist_group) that runs `item`; None without pytest-xdist."""
    marker = item.get_closest_marker("xdist_group")
    return None if marker is None else (marker.args[0] if marker.args else marker.kwargs["name"])


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`uv run pytest` starts one worker per core, and one more) every worker runs one shard of
    whole test modules, planned alike in every worker from tests/module_seconds.json (each module's
    measured seconds, so that the shards end together). A shard known from its first test lets its
    worker start the background work of all its modules at once (`background_work`)."""
    shards = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if shards < 2:
        return
    modules = list(dict.fromkeys(module_of(item) for item in items))
    plan = shard_plan(modules, shards)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(f"shard-{plan[module_of(item)]}"))


def module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def shard_plan(modules: list[str], shards: int) -> dict[str, int]:
    """Each module's shard: the longest modules first, each to the shard with the fewest seconds so far."""
    measured = json.loads(MODULE_SECONDS.read_text())
    default = sorted(measured.values())[len(measured) // 2]  # a module not measured yet: the median
    load, plan = [0.0] * shards, {}
    for module in sorted(modules, key=lambda m: (-measured.get(m, default), m)):
        shard = load.index(min(load))
        plan[module] = shard
        load[shard] += measured.get(module, default)
    return plan


FIRST_TEST = pytest.StashKey[pytest.Item]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.session.stash.setdefault(FIRST_TEST, item)  # before its fixtures: `background_work` reads its shard


@pytest.fixture(scope="session", autouse=True)
def background_work(request, tmp_path_factory):
    """Starts, as the session begins, the background work of every fixture that a test of this session's
    shard uses (all tests without xdist; a test module's `BACKGROUND`: fixture name -> a
    helpers.Background, or a tuple of them for a parametrized fixture), so that the processes it drives
    (a CLI, a notebook's kernel) run while other tests run in this process. Ends it with the session:
    work not started is dropped, running work gives up its waits and stops its processes, and what no
    test took is cleaned up."""
    shard = shard_of(request.session.stash[FIRST_TEST])
    scheduled = []
    for item in request.session.items:
        if shard_of(item) != shard:
            continue
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


# --- Measuring the modules for the shard plan (`--measure-modules`) --------------------------------

MEASURED = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A test's seconds in its shard's process: its wall time, the background work its process's main thread ran
    or waited for meanwhile included. Work on the background thread is not counted: it runs while tests run,
    so a shard's wall time is the sum of its tests' (a plan that counted that work too gave the shards with
    little background work 100 s more, measured in docs/testing.md)."""
    if not item.config.getoption("measure_modules"):
        yield
        return
    start = time.perf_counter()
    yield
    measured = item.config.stash.setdefault(MEASURED, {})
    measured[module_of(item)] = measured.get(module_of(item), 0.0) + time.perf_counter() - start


def pytest_sessionfinish(session):
    config = session.config
    if not config.getoption("measure_modules"):
        return
    measured = dict(config.stash.get(MEASURED, {}))
    if hasattr(config, "workeroutput"):  # an xdist worker: the controller writes the file
        config.workeroutput["module_seconds"] = measured
        return
    for node_measured in config.stash.get(WORKERS_MEASURED, []):
        for module, seconds in node_measured.items():
            measured[module] = measured.get(module, 0.0) + seconds
    write_module_seconds(measured)


WORKERS_MEASURED = pytest.StashKey[list]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller: a worker's measurements."""
    measured = getattr(node, "workeroutput", {}).get("module_seconds")
    if measured:
        node.config.stash.setdefault(WORKERS_MEASURED, []).append(measured)


def write_module_seconds(measured: dict[str, float]) -> None:
    """Updates the measured modules' seconds, each the mean of this run's figure and the one before (a module
    whose tests wait on background work varies by a minute from run to run); modules this run did not measure
    keep theirs."""
    known = json.loads(MODULE_SECONDS.read_text()) if MODULE_SECONDS.exists() else {}
    known |= {module: round((seconds + known.get(module, seconds)) / 2, 1) for module, seconds in measured.items()
              if module != "?"}
    MODULE_SECONDS.write_text(json.dumps(dict(sorted(known.items())), indent=1) + "\n")
    print(f"\nwrote {len(measured)} modules' seconds to tests/{MODULE_SECONDS.name}")
