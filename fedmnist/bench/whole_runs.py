"""Whole runs as fresh processes: wall time, CPU time and peak memory of the process tree.

`whole_runs` times the package's default run against the bare TFF tutorial script
(`fedmnist.bench.bare_tutorial`); `core_scaling` times a workload pinned to one core, then to all.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedmnist.bench.memory import TreeMemory

# fedmnist.runtime runs TFF's worker with one thread per op (faster, see there); "0" gives the bare
# script TensorFlow's own default, as TFF's default context would.
STOCK_WORKER_ENV = {"TF_NUM_INTRAOP_THREADS": "0"}


def time_process(command: list[str], cpus: set[int] | None = None, env: dict[str, str] | None = None,
                 lines: bool = False) -> dict:
    """Wall time, CPU time (its own and its reaped children's, i.e. its TFF workers'), and peak tree
    RSS of a fresh process. CPU seconds are less disturbed than wall time by other load on the machine.
    With `lines`, also when each stdout line appeared (`lines`: (seconds since the start, line) pairs; the
    process should not buffer its output, e.g. PYTHONUNBUFFERED=1)."""
    timed_lines: list[tuple[float, str]] = []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        # No preexec_fn: Python code between fork and exec can deadlock on a lock that one of this
        # process's threads (gRPC's, TreeMemory's) held at the fork. The affinity is set right after.
        # TMPDIR: this command's own temporary directory (`cli.own_temporary_directory`), removed when it ends,
        # so what a timed process leaves there (the bare script's AutoGraph files) goes with it.
        process = subprocess.Popen(command, stdout=subprocess.PIPE if lines else out, stderr=err, text=True,
                                   env=dict(os.environ) | {"TMPDIR": tempfile.gettempdir()} | (env or {}))
        reader = None
        if lines:
            def read() -> None:
                for line in process.stdout:
                    timed_lines.append((time.perf_counter() - started, line.rstrip("\n")))
                    out.write(line)

            reader = threading.Thread(target=read, name="read stdout", daemon=True)
            reader.start()
        if cpus is not None:
            os.sched_setaffinity(process.pid, cpus)
        with TreeMemory(process.pid) as memory:
            _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        if reader is not None:
            reader.join(timeout=10)  # the pipe closes when the process and anything it started are gone
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({process.returncode}): {stderr.strip()[-500:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": memory.peak / 1e9, "stdout": stdout, "lines": timed_lines}


def whole_runs(repeats: int) -> dict:
    """`python -m fedmnist.train` (default config) vs the bare tutorial script, interleaved."""
    results: dict[str, list] = {"package_default_run": [], "bare_tutorial_script": []}
    with tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as scratch:
        for i in range(repeats):
            run = time_process([sys.executable, "-m", "fedmnist.train", "--quiet", "--run-dir",
                                str(Path(scratch) / f"run{i}")])
            results["package_default_run"].append(run)
            results["bare_tutorial_script"].append(
                time_process([sys.executable, "-m", "fedmnist.bench.bare_tutorial"], env=STOCK_WORKER_ENV))
    return {name: _median_run(runs) for name, runs in results.items()}


def _median_run(runs: list[dict]) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "all_seconds": [r["seconds"] for r in runs],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
            "last_lines": runs[-1]["stdout"].strip().splitlines()[-3:]}


def core_scaling(workload: str, extra: tuple[str, ...] = ()) -> dict:
    """The package path and the floor of `workload` in fresh processes pinned to one core, then to all."""
    all_cpus = os.sched_getaffinity(0)
    out = {}
    with tempfile.TemporaryDirectory(prefix="fedmnist-bench-") as scratch:
        for label, cpus in (("one_core", {min(all_cpus)}), ("all_cores", all_cpus)):
            json_path = Path(scratch) / f"{label}.json"
            time_process([sys.executable, "-m", "fedmnist.bench", "--workload", workload, "--paths",
                          "prepared", "--no-cores", "--no-float-noise", "--json", str(json_path)]
                         + [f"--set={e}" for e in extra], cpus=cpus)
            figures = json.loads(json_path.read_text())[workload]
            out[label] = {"cpus": len(cpus), "steady_s_per_round": figures["prepared"]["steady_s_per_round"],
                          "examples_per_s": figures["prepared"]["examples_per_s"],
                          "floor_steady_s_per_round": figures["floor"]["steady_s_per_round"]}
    out["speedup"] = out["one_core"]["steady_s_per_round"] / out["all_cores"]["steady_s_per_round"]
    out["floor_speedup"] = (out["one_core"]["floor_steady_s_per_round"]
                            / out["all_cores"]["floor_steady_s_per_round"])
    return out
