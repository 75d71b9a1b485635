"""fedmnist.imports: the commands' imports kept out of the garbage collector's passes, once per process."""

import subprocess
import sys
import textwrap

# Run in a fresh interpreter: this test session froze its own imports at collection (conftest.py).
PROGRAM = textwrap.dedent("""
    import atexit, gc
    from fedmnist.imports import long_lived_imports

    enabled_inside = []
    with long_lived_imports():
        import decimal, json  # stand-ins for TensorFlow's modules
        enabled_inside.append(gc.isenabled())
    frozen = gc.get_freeze_count()
    garbage = [[] for _ in range(1000)]
    with long_lived_imports():  # a second run's import: nothing more is frozen
        import fractions
    print(enabled_inside[0], gc.isenabled(), frozen > 1000, gc.get_freeze_count() == frozen)
    atexit._run_exitfuncs()  # what interpreter shutdown runs first
    print(gc.get_freeze_count())
""")


def test_imports_are_frozen_once_with_the_collector_paused_and_unfrozen_at_exit():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True", "True", "0"]


def test_a_process_that_never_closes_the_installed_runtime_ends_without_tffs_own_context():
    # TFF's own default context, frozen with TFF's import (the commands', the test session's) and left to
    # interpreter shutdown, printed its finalizer's traceback at exit (seen at the end of a `--collect-only`
    # session). The package's runtime, installed and never closed (a notebook's kernel, such a session), must
    # leave the release's context behind, not TFF's own, which its `close` restores.
    program = textwrap.dedent("""
        import atexit
        from fedmnist.imports import long_lived_imports

        with long_lived_imports():
            import tensorflow_federated as tff
        tffs_own = tff.framework.get_context_stack().current
        atexit.register(lambda: print("TFF's own at the end:", tff.framework.get_context_stack().current is tffs_own))
        from fedmnist import runtime

        runtime.install()
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "TFF's own at the end: False", (done.stdout, done.stderr[-2000:])
    assert "Exception ignored" not in done.stderr, done.stderr[-2000:]
