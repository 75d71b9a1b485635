"""Evaluations (fedmnist.evaluation): federated evaluation built when first needed, in a thread overlapped
with the rounds, never before round 1, and the centralized evaluation's Keras model kept valid around it."""

from __future__ import annotations

import pytest

from helpers import metrics_rows, small_config


class FakeFederated:
    """The part of FederatedEvaluator that Evaluations drives, recording what it is asked."""

    def __init__(self):
        self.calls: list[str] = []
        self.building = self.built = False
        self.data = {"train": ["a"], "test": ["b"]}

    def start_building(self):
        if not (self.building or self.built):
            self.calls.append("start")
            self.building = True

    def settle(self):
        self.calls.append("settle")
        finished, self.building = self.building, False
        self.built = self.built or finished
        return finished

    def ready(self):
        self.calls.append("ready")
        built_now = self.settle() or not self.built
        self.built = True
        return built_now

    def __call__(self, weights, data):
        self.calls.append(f"evaluate {data[0]}")
        return {"loss": 1.0}


class FakeCentralized:
    def __init__(self):
        self.calls: list[str] = []

    def forget_model(self):
        self.calls.append("forget")

    def __call__(self, weights):
        self.calls.append("evaluate")
        return {"loss": 2.0}


@pytest.mark.unit
def test_federated_evaluation_is_built_in_the_background_during_the_round_before_it_is_due():
    from fedmnist.evaluation import Evaluations

    federated = FakeFederated()
    evaluations = Evaluations(federated, every=0, last_round=5)
    for round_num in (1, 2, 3):
        assert evaluations(round_num, None) is None and federated.calls == []
    assert evaluations(4, None) is None and federated.calls == ["start"]
    assert evaluations(5, None) == {"train": {"loss": 1.0}, "test": {"loss": 1.0}}
    assert federated.calls == ["start", "ready", "settle", "evaluate a", "evaluate b"]
    federated = FakeFederated()
    evaluations = Evaluations(federated, every=3, last_round=7)
    evaluations(1, None)
    evaluations(2, None)
    assert federated.calls == ["start"]      # due in round 3


@pytest.mark.unit
def test_federated_evaluation_due_in_the_first_round_is_built_there():
    from fedmnist.evaluation import Evaluations

    for every, last_round in ((1, 5), (0, 1)):
        federated = FakeFederated()
        assert set(Evaluations(federated, every=every, last_round=last_round)(1, None)) == {"train", "test"}
        assert federated.calls[:2] == ["ready", "settle"] and "start" not in federated.calls


@pytest.mark.unit
def test_no_eager_keras_model_is_used_while_the_federated_evaluation_is_built():
    # Building it builds Keras models in graphs, which invalidates eager ones: the centralized evaluation
    # waits for a build in progress and then builds its Keras model again.
    from fedmnist.evaluation import Evaluations

    federated, centralized = FakeFederated(), FakeCentralized()
    evaluations = Evaluations(federated, every=0, last_round=4, centralized=centralized, centralized_every=1)
    for round_num in (1, 2, 3):
        assert evaluations(round_num, None) == {"centralized": {"loss": 2.0}}
    assert centralized.calls == ["evaluate"] * 3 and federated.building
    federated.building, federated.built = True, False    # still building when round 4 evaluates
    assert set(evaluations(4, None)) == {"train", "test", "centralized"}
    assert centralized.calls[3:] == ["forget", "evaluate"] and federated.built and not federated.building

    # A build that the centralized evaluation waits for, before the federated one is due.
    federated, centralized = FakeFederated(), FakeCentralized()
    evaluations = Evaluations(federated, every=0, last_round=4, centralized=centralized, centralized_every=1)
    federated.start_building()
    evaluations(1, None)
    assert centralized.calls == ["forget", "evaluate"] and not federated.building
    evaluations(2, None)
    assert centralized.calls[2:] == ["evaluate"]     # nothing built since: the model is kept


@pytest.mark.unit
def test_a_federated_evaluator_builds_in_the_background_once():
    from fedmnist.evaluation import FederatedEvaluator
    from fedmnist.model import build_model_fn

    made = []
    evaluator = FederatedEvaluator(build_model_fn(), data=lambda: made.append(1) or {"train": []})
    assert evaluator.process is None and not evaluator.building
    evaluator.start_building()
    evaluator.start_building()
    assert evaluator.building
    assert evaluator.settle() is True and evaluator.settle() is False
    assert made == [1] and evaluator.process is None      # initialized only where it is used (`ready`)


def run_with(run_dir, *overrides):
    """A 3-round run in this process; its metrics rows, and at each round whether the federated
    evaluation was built or being built (0: once the experiment is built)."""
    from fedmnist import experiment, loop

    config = small_config("rounds=3", *overrides)
    seen = {}
    run_dir.mkdir()
    with experiment.build(config, run_dir, echo=lambda line: None) as built:
        federated = built.evaluations.federated
        seen[0] = federated.process is not None or federated.building

        def round_done(record):
            seen[record.round] = federated.process is not None or federated.building

        loop.run(built, loop.Hooks(round_done=round_done))
    return metrics_rows(run_dir), seen


def test_lazy_federated_evaluation_keeps_centralized_runs_and_their_numbers(tmp_path):
    """`centralized_eval_every=1` with federated evaluation only after the last round (built in the background
    while the centralized evaluation's Keras model is in use) and with it every round (built in round 1): the
    same numbers; and no federated evaluation built before round 1."""
    lazy, seen = run_with(tmp_path / "lazy", "centralized_eval_every=1", "eval_every=0")
    assert seen == {0: False, 1: False, 2: True, 3: True}
    every, seen_every = run_with(tmp_path / "every", "centralized_eval_every=1", "eval_every=1")
    assert seen_every[0] is False and seen_every[1] is True
    assert [sorted(r["eval"]) for r in lazy] == [["centralized"]] * 2 + [["centralized", "test", "train"]]
    assert all(sorted(r["eval"]) == ["centralized", "test", "train"] for r in every)
    for a, b in zip(lazy, every):
        assert a["train"] == pytest.approx(b["train"], abs=1e-6)
        assert a["eval"]["centralized"] == pytest.approx(b["eval"]["centralized"], abs=1e-6)
    for split in ("train", "test", "centralized"):
        assert lazy[-1]["eval"][split] == pytest.approx(every[-1]["eval"][split], abs=1e-6)
