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
