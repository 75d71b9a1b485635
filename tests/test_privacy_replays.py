"""Every noised release counted: a `dp` or `secure_dp` run is crashed at each point of a round (before the
aggregation, after it, after the round's metrics, after its checkpoint), has a worker restarted mid-round,
and is resumed each time; the epsilon it prints is at least the accountant's epsilon for the releases that
really happened, counted here from what the server computed, not from the package's own count."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dp_accounting
import pytest

from fedmnist import config as config_lib
from fedmnist import experiment as experiment_lib
from fedmnist import loop, runtime
from fedmnist.privacy import secagg
from helpers import SMALL, metrics_rows

ROUNDS = 3


class Crash(Exception):
    """A simulated crash of the training process."""


def dp_config(mode: str):
    extra = {"dp": ["aggregation=dp", "dp.noise_multiplier=0.3"],
             "secure_dp": ["aggregation=secure_dp", "secure_dp.noise_multiplier=0.5"]}[mode]
    return config_lib.load(None, SMALL + [f"rounds={ROUNDS}", "histogram_every=0", *extra])


class ServerSide:
    """Counts the noised aggregates the server really computes: dp's are made inside TFF's `next` (counted
    when a call returns), secure_dp's when the server unmasks the protocol's sum."""

    def __init__(self, monkeypatch):
        self.releases = 0
        unmask = secagg.server_aggregate

        def counting_unmask(view):
            total = unmask(view)
            self.releases += 1
            return total

        monkeypatch.setattr(secagg, "server_aggregate", counting_unmask)

    def watch_dp(self, experiment) -> None:
        next_fn = experiment.training.process.next

        def counting_next(*args):
            output = next_fn(*args)
            self.releases += 1
            return output

        replace_next(experiment, counting_next)


class Process:
    """A training process with its `next` replaced (TFF's processes do not allow setting it)."""

    def __init__(self, process, next_fn):
        self._process, self.next = process, next_fn

    def __getattr__(self, name):
        return getattr(self._process, name)


def replace_next(experiment, next_fn) -> None:
    experiment.training = dataclasses.replace(experiment.training, process=Process(experiment.training.process,
                                                                                   next_fn))


def crash_at(experiment, point: str, round_num: int, server: ServerSide, mode: str):
    """Arranges a crash at `point` of round `round_num` (or a worker restart there, `restart`)."""
    if mode == "dp":
        server.watch_dp(experiment)
    next_fn = experiment.training.process.next

    def next_then(*args):
        if current[0] == round_num and point == "before aggregation":
            raise Crash(point)
        output = next_fn(*args)
        if current[0] == round_num and point in ("after aggregation", "restart") and not fired:
            fired.append(point)
            if point == "restart":
                raise runtime.WorkerLostError("worker 1", "the test", "was lost as a test", restartable=True)
            raise Crash(point)
        return output

    current, fired = [0], []
    begin = experiment.training.begin_round

    def begin_round(number):
        current[0] = number
        return begin(number)

    experiment.training.begin_round = begin_round
    replace_next(experiment, next_then)
    outputs = experiment.outputs.outputs
    index = {"after metrics": 0, "after checkpoint": 2}.get(point)
    if index is not None:
        release = outputs[index].release

        def release_then(record, state, weights):
            release(record, state, weights)
            if record.round == round_num:
                raise Crash(point)

        outputs[index].release = release_then


def play(run_dir: Path, mode: str, server: ServerSide, point: str | None, round_num: int, resume: bool) -> dict | None:
    config = dp_config(mode)
    with experiment_lib.build(config, run_dir, echo=lambda line: None, resume=resume) as experiment:
        if point is None:
            if mode == "dp":
                server.watch_dp(experiment)
            return loop.run(experiment)
        crash_at(experiment, point, round_num, server, mode)
        try:
            return loop.run(experiment)
        except Crash:
            return None


def accountant_epsilon(mode: str, releases: int, summary: dict) -> float:
    """dp: dp_accounting's RDP epsilon for that many Poisson-sampled Gaussian releases; secure_dp: the
    mode's distributed accounting (checked against the authors' code in test_distributed_dp.py)."""
    if mode == "dp":
        q, z = summary["sampling_rate"], 0.3
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), releases)
        return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(summary["delta"])
    from fedmnist.privacy.distributed_accounting import ddp_epsilon
    from fedmnist.privacy.distributed_dp import ddp_parameters
    from fedmnist.privacy.secure import secure_threshold

    config = dp_config(mode)
    params = ddp_parameters(config.secure_dp, config.clients_per_round, secure_threshold(config), 784 * 10 + 10)
    return ddp_epsilon(params, releases, summary["delta"])


@pytest.mark.parametrize("mode", ["dp", "secure_dp"])
def test_every_release_is_counted_through_crashes_restarts_and_resumes(tmp_path, monkeypatch, mode):
    server = ServerSide(monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Round 1 crashes after its aggregation (a release nothing logged), round 2 after its metrics line and then
    # after its checkpoint, round 3 before its aggregation and then with a worker restart mid-round.
    steps = [("after aggregation", 1), ("after metrics", 2), ("after checkpoint", 2),
             ("before aggregation", 3), ("restart", 3)]
    for number, (point, round_num) in enumerate(steps):
        assert play(run_dir, mode, server, point, round_num, resume=number > 0) is None or point == "restart"
        if point == "restart":
            break
    summary = json.loads((run_dir / "summary.json").read_text())["aggregation"]
    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert server.releases > ROUNDS  # rounds were played again: more releases than rounds
    assert summary["releases"] >= server.releases
    assert summary["epsilon"] >= accountant_epsilon(mode, server.releases, summary) - 1e-9
    assert summary["epsilon"] > accountant_epsilon(mode, ROUNDS, summary)  # the rounds alone would understate it
    assert rows[-1]["aggregation"]["epsilon"] == pytest.approx(summary["epsilon"])
