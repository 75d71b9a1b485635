"""The command line: `python -m fedmnist.bench` and `fedmnist bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import fedmnist.bench
from fedmnist import config as config_lib
from fedmnist.bench.report import format_explore, format_workload
from fedmnist.bench.startup import format_startup
from fedmnist.bench.startup import measure as measure_startup
from fedmnist.bench.whole_runs import core_scaling, whole_runs
from fedmnist.bench.workloads import DEFAULT_WORKLOADS, PATH_OVERRIDES, WORKLOAD_SPECS, WORKLOADS, run_package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedmnist.bench",
                                     description=fedmnist.bench.__doc__.split("\n\n")[0])
    parser.add_argument("--workload", action="append", choices=WORKLOADS,
                        help="tutorial and cnn by default; scale, paper-round and startup are opt-in (repeatable)")
    parser.add_argument("--json", type=Path, help="write all figures to this JSON file")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATH_OVERRIDES),
                        help="package variants to run (default: per workload)")
    parser.add_argument("--no-floor", action="store_true", help="skip the plain-TensorFlow floor")
    parser.add_argument("--whole-runs", type=int, default=2, metavar="N",
                        help="tutorial: time the whole default run and the bare script N times each (0 = skip)")
    parser.add_argument("--pairs", type=int, default=3, metavar="N",
                        help="startup: alternations of the default run, the bare script and the phased run "
                             "after the warm-up (default 3)")
    parser.add_argument("--no-cores", action="store_true", help="cnn: skip the one-core vs all-cores runs")
    parser.add_argument("--no-float-noise", action="store_true",
                        help="skip the floor's second run from weights one ulp away (agreement tolerance 1e-6)")
    parser.add_argument("--explore", action="store_true",
                        help="also time TFF's options (worker concurrency, iterator loop, datasets built "
                             "in the worker, prepared tensors, 2 workers) on the tutorial workload")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key of every workload, e.g. --set rounds=20")
    return parser


def run_workload(name: str, paths: tuple[str, ...], floor: bool, whole_run_repeats: int,
                 cores: bool, log: Callable[[str], None], extra: tuple[str, ...] = (),
                 float_noise: bool = True) -> dict:
    """All of one workload's measurements: its package paths, the floor, and its fresh-process runs."""
    # TensorFlow loads here, once a workload runs, so that --help and usage errors answer at once.
    from fedmnist.bench.floor import run_floor
    from fedmnist.bench.population import scale_population

    spec = WORKLOAD_SPECS[name]
    dataset, out = None, {"workload": spec.note}
    if name == "scale":
        dataset, total = scale_population()
        out["population_train_examples"] = total
    for path in paths:
        log(f"[{name}] package path: {path}")
        config = config_lib.load(None, list(spec.overrides) + list(PATH_OVERRIDES[path]) + list(extra))
        out[path] = run_package(config, dataset)
    if floor:
        log(f"[{name}] plain-TensorFlow floor")
        floor_config = config_lib.load(None, list(spec.overrides) + list(extra))
        out["floor"] = run_floor(floor_config, dataset)
        if float_noise and spec.measure_float_noise:
            log(f"[{name}] plain-TensorFlow floor, initial weights one ulp away (float32 noise)")
            out["floor_nudged"] = run_floor(floor_config, dataset, nudge_weights=True)
    if name == "tutorial" and whole_run_repeats:
        log(f"[{name}] whole runs as fresh processes ({whole_run_repeats}x each)")
        out["whole_run"] = whole_runs(whole_run_repeats)
    if name == "cnn" and cores:
        log(f"[{name}] one core vs all cores (fresh processes)")
        out["cores"] = core_scaling(name, extra)
    return out


def log(message: str) -> None:
    """Progress goes to stderr; the figures' lines to stdout."""
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = {"load_average_at_start": os.getloadavg()[0], "cpus": len(os.sched_getaffinity(0))}
    print(f"machine: {results['cpus']} CPUs, load average {results['load_average_at_start']:.2f} at start", flush=True)
    for name in args.workload or (() if args.explore else DEFAULT_WORKLOADS):
        if name == "startup":   # fresh processes only: nothing of TensorFlow loads here
            results[name] = measure_startup(args.pairs, log, tuple(args.set))
            print("\n".join(format_startup(results[name])), flush=True)
            continue
        paths = tuple(args.paths or WORKLOAD_SPECS[name].paths)
        results[name] = run_workload(name, paths, not args.no_floor, args.whole_runs,
                                     not args.no_cores, log, tuple(args.set), not args.no_float_noise)
        print("\n".join(format_workload(name, results[name])), flush=True)
    if args.explore:
        from fedmnist.bench.explore import explore   # TensorFlow, as in run_workload

        results["explore"] = explore(log=log)
        print("\n".join(format_explore(results["explore"])), flush=True)
    results["load_average_at_end"] = os.getloadavg()[0]
    print(f"load average {results['load_average_at_end']:.2f} at end (other processes on the machine "
          f"slow every figure above; ratios measured in the same process are the robust ones)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from fedmnist.cli import own_temporary_directory

    with own_temporary_directory():
        code = main()
    sys.exit(code)
