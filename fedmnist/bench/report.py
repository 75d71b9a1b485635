"""The printed lines: each workload's table and comparisons, the agreement tolerance, `--explore`'s table."""

from __future__ import annotations

import statistics

from fedmnist.bench.figures import max_diff
from fedmnist.bench.workloads import PATH_OVERRIDES

AGREEMENT_TOLERANCE = 1e-6


def agreement_tolerance(figures: dict) -> tuple[float, float | None]:
    """The final-accuracy tolerance: 1e-6, or twice the float32 noise when that is larger.

    The noise is how far the floor's accuracy moves, at most over the rounds, when only its initial
    weights move by one ulp: a nonlinear model amplifies rounding differences round after round, and the
    worker's TensorFlow build rounds its kernels differently from this process's.
    """
    if "floor_nudged" not in figures:
        return AGREEMENT_TOLERANCE, None
    noise = max(abs(a["accuracy"] - b["accuracy"])
                for a, b in zip(figures["floor"]["per_round"], figures["floor_nudged"]["per_round"]))
    return max(AGREEMENT_TOLERANCE, 2 * noise), noise


def format_workload(name: str, figures: dict) -> list[str]:
    """A workload's lines: one row per path, then how the paths compare with the floor and each other."""
    paths = [p for p in (*PATH_OVERRIDES, "floor") if p in figures]
    lines = [f"== {name}: {figures['workload']}",
             f"{'path':<20} {'s/round':>9} {'round 1 s':>10} {'examples/s':>11} {'peak RSS GB':>12} {'final acc':>10}"]
    lines += [_path_row(path, figures[path]) for path in paths]
    if "floor" in figures:
        lines += _floor_agreement(figures, paths[:-1])
    lines += _paths_compared(figures)
    if "whole_run" in figures:
        lines.append(_whole_run_line(figures["whole_run"]))
    if "cores" in figures:
        lines.append(_cores_line(figures["cores"]))
    if name == "scale":
        lines += [line for path in paths if (line := _memory_growth(path, figures[path]))]
    return lines


def _path_row(path: str, f: dict) -> str:
    return (f"{path:<20} {f['steady_s_per_round']:>9.4f} {f['round1_s']:>10.3f} "
            f"{f['examples_per_s']:>11,.0f} {f['peak_rss_gb']:>12.2f} {f['final_accuracy']:>10.6f}")


def _floor_agreement(figures: dict, paths: list[str]) -> list[str]:
    """Each package path's speed relative to the floor, and whether its final accuracy agrees."""
    floor = figures["floor"]
    tolerance, noise = agreement_tolerance(figures)
    lines = []
    if noise is not None:
        lines.append(f"float32 noise: the floor from initial weights one ulp away moves its accuracy by up to "
                     f"{noise:.1e}; tolerance max(1e-6, 2 x noise) = {tolerance:.1e}")
    for path in paths:
        f = figures[path]
        diff = abs(f["final_accuracy"] - floor["final_accuracy"])
        verdict = "agree" if diff <= tolerance else "DISAGREE"
        first_loss = abs(f["per_round"][0]["loss"] - floor["per_round"][0]["loss"])
        lines.append(f"{path} / floor: {f['steady_s_per_round'] / floor['steady_s_per_round']:.1f}x "
                     f"per round; final accuracy {verdict} with the floor (|diff| {diff:.1e} "
                     f"vs tolerance {tolerance:.1e}; round-1 loss |diff| {first_loss:.1e}, "
                     f"all rounds max {max_diff(f['per_round'], floor['per_round']):.1e})")
    return lines


def _paths_compared(figures: dict) -> list[str]:
    """The prepared paths against the article's (tff-datasets), and two workers against one."""
    lines = []
    if "tff-datasets" in figures:
        article = figures["tff-datasets"]
        for path in ("prepared", "prepared-2-workers"):
            if path in figures:
                diff = max_diff(article["per_round"], figures[path]["per_round"])
                faster = article["steady_s_per_round"] / figures[path]["steady_s_per_round"]
                lines.append(f"{path} vs tff-datasets (the article's path): per-round loss/accuracy max "
                             f"|diff| {diff:.1e}; {faster:.1f}x faster")
    if "prepared" in figures and "prepared-2-workers" in figures:
        speedup = figures["prepared"]["steady_s_per_round"] / figures["prepared-2-workers"]["steady_s_per_round"]
        lines.append(f"2 local workers vs 1: {speedup:.2f}x speed-up")
    return lines


def _whole_run_line(w: dict) -> str:
    pkg, bare = w["package_default_run"], w["bare_tutorial_script"]
    return (f"whole run, fresh processes, median of {len(pkg['all_seconds'])}: `python -m fedmnist.train` "
            f"{pkg['seconds']:.1f} s wall, {pkg['cpu_seconds']:.1f} s CPU, peak {pkg['peak_rss_gb']:.2f} GB; "
            f"bare TFF tutorial script {bare['seconds']:.1f} s wall, {bare['cpu_seconds']:.1f} s CPU, "
            f"peak {bare['peak_rss_gb']:.2f} GB: package "
            f"{'no longer' if pkg['seconds'] <= bare['seconds'] else 'LONGER'} (wall), "
            f"{'no longer' if pkg['cpu_seconds'] <= bare['cpu_seconds'] else 'LONGER'} (CPU)")


def _cores_line(c: dict) -> str:
    return (f"cores: one core {c['one_core']['steady_s_per_round']:.3f} s/round, "
            f"{c['all_cores']['cpus']} cores {c['all_cores']['steady_s_per_round']:.3f} s/round: "
            f"{c['speedup']:.2f}x (the floor: {c['one_core']['floor_steady_s_per_round']:.3f} vs "
            f"{c['all_cores']['floor_steady_s_per_round']:.3f} s/round, {c['floor_speedup']:.2f}x)")


def _memory_growth(path: str, f: dict) -> str | None:
    """The tree's RSS around round 20 against the last rounds but two (the `scale` workload), or None.

    The last round builds and runs the federated evaluation (fedmnist/evaluation.py): a one-off allocation
    of tens of MB, not growth; the round before it is left out too."""
    rss = f.get("rss_gb_by_round", {})
    if 20 not in rss or max(rss) < 27:
        return None
    last = max(rss) - 2

    # Medians over 5 rounds: a single sample swings with the round's transient buffers.
    def window(series: dict, end: int) -> float:
        return statistics.median(series[r] for r in range(end - 4, end + 1))

    early, late = window(rss, 20), window(rss, last)
    workers = f["workers_rss_gb_by_round"]
    return (f"{path}: tree RSS {early:.3f} GB at rounds 16-20, {late:.3f} GB at rounds "
            f"{last - 4}-{last} ({(late - early) / early * 100:+.1f}%; TFF workers "
            f"{window(workers, 20):.3f} -> {window(workers, last):.3f} GB)")


def format_explore(results: dict) -> list[str]:
    """`--explore`'s table: each variant's seconds per round, its speed-up and its metrics' distance."""
    base = next(iter(results.values()))["steady_s_per_round"]
    lines = ["== explore: the tutorial workload through each of TFF's options (process.next only; "
             "best of the repeats' medians)",
             f"{'variant':<62} {'s/round':>8} {'vs article':>10} {'metrics |diff|':>15}"]
    for name, f in results.items():
        lines.append(f"{name:<62} {f['steady_s_per_round']:>8.4f} {base / f['steady_s_per_round']:>9.1f}x "
                     f"{f['max_metric_diff_vs_article']:>15.1e}")
    return lines
