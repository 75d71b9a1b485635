"""One default run, as `python -m fedmnist.train --quiet --run-dir DIR` plays it, with the moment each phase ends.

    FEDMNIST_BENCH_LAUNCHED=<time.time() at launch> python -m fedmnist.bench.startup_run RUN_DIR [KEY=VALUE ...]

`fedmnist.bench.startup` runs it as a fresh process. Its last stdout line is JSON: `marks`, seconds since
the launch (the parent's `time.time()` just before starting the process) at which each step ended, in the
order the run reaches them; `evaluation_seconds`, the time spent in the rounds' evaluations; and the last
evaluation's metrics (`final_eval`). The steps are train.py's for a new run (config, run directory, imports, build, rounds,
finish); the data is loaded when the build prints its `data:` line. It is a script, not a library module.
"""

import os
import time

LAUNCHED = float(os.environ.get("FEDMNIST_BENCH_LAUNCHED", time.time()))
marks: dict[str, float] = {}


def mark(name: str) -> None:
    marks[name] = time.time() - LAUNCHED


mark("python")

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from fedmnist import config as config_lib  # noqa: E402

config = config_lib.load(None, sys.argv[2:])
run_dir = Path(sys.argv[1])
run_dir.mkdir(parents=True)
mark("config")  # train.py prints the run directory here

from fedmnist.imports import long_lived_imports  # noqa: E402

with long_lived_imports():  # as train.py imports them
    import tensorflow  # noqa: E402,F401

    mark("tensorflow")
    import tensorflow_federated  # noqa: E402,F401

    mark("tff")
    from fedmnist import experiment, loop  # noqa: E402

mark("fedmnist")


def echo(line: str) -> None:
    if line.startswith("data:"):
        mark("data")


class TimedEvaluations:
    """The experiment's evaluations, timed."""

    def __init__(self, evaluations):
        self.evaluations, self.seconds = evaluations, 0.0

    def __call__(self, round_num, weights):
        started = time.perf_counter()
        try:
            return self.evaluations(round_num, weights)
        finally:
            self.seconds += time.perf_counter() - started

    def __getattr__(self, name):
        return getattr(self.evaluations, name)


last_eval = {}


def round_done(record) -> None:
    mark(f"round {record.round}")
    if record.eval:
        last_eval.update(record.eval)


with experiment.build(config, run_dir, echo=echo) as built:
    mark("build")
    built.evaluations = timed = TimedEvaluations(built.evaluations)
    loop.run(built, loop.Hooks(round_done=round_done))
    mark("finish")
mark("stop")
print(json.dumps({"marks": marks, "evaluation_seconds": timed.seconds, "rounds": config.rounds,
                  "final_eval": last_eval}, default=float))
sys.stdout.flush()
os._exit(0)  # as train.py: no interpreter teardown
