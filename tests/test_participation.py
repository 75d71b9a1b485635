"""Client availability, selection and dropouts."""

import numpy as np
import pytest

from fedmnist import config as config_lib
from fedmnist.clients.participation import ARCHETYPES, Participation
from helpers import quiet_train

IDS = [f"client_{i:03d}" for i in range(400)]


def make(*overrides, ids=IDS):
    config = config_lib.load(None, ["data.dataset=synthetic", f"data.num_clients={len(ids)}", *overrides])
    return Participation(config, ids)


@pytest.mark.unit
def test_always_available_is_the_article():
    plans = [make().plan(r) for r in (1, 2)]
    assert all(p.selected == IDS[:10] == p.completed and p.available == len(IDS) for p in plans)
    uniform = make("client_selection=uniform")
    assert uniform.plan(1).selected != uniform.plan(2).selected
    assert uniform.plan(3) == make("client_selection=uniform").plan(3)


@pytest.mark.unit
def test_availability_over_a_simulated_week_follows_the_archetypes():
    model = make("availability.model=daily", "availability.round_minutes=60", "clients_per_round=400")
    hits = {name: np.zeros(24) for name in ARCHETYPES}
    seen = {name: np.zeros(24) for name in ARCHETYPES}
    for round_num in range(1, 7 * 24 + 1):
        available = set(model.available(round_num))
        hour = (int(model.clock_hours(round_num)) + model.shift) % 24
        for cid, archetype, h in zip(IDS, model.archetypes, hour):
            seen[archetype][h] += 1
            hits[archetype][h] += cid in available
    for name, profile in ARCHETYPES.items():
        observed = hits[name].sum() / seen[name].sum()
        expected = (profile[np.nonzero(seen[name])[0]] * seen[name][seen[name] > 0]).sum() / seen[name].sum()
        assert observed == pytest.approx(expected, abs=0.03), name
    night = [len(model.available(r)) for r in range(1, 25)]
    assert np.mean(night[0:6]) > 1.5 * np.mean(night[11:16])  # 00-06 busier than 11-16
    shares = {name: np.mean(model.archetypes == name) for name in ARCHETYPES}
    assert shares["night_charger"] == pytest.approx(0.6, abs=0.07)


@pytest.mark.unit
def test_only_available_clients_are_selected_and_dropouts_are_seeded():
    model = make("availability.model=daily", "availability.dropout=0.3", "client_selection=uniform",
                 "clients_per_round=20")
    dropped = 0
    for round_num in range(1, 50):
        plan = model.plan(round_num)
        assert set(plan.selected) <= set(model.available(round_num))
        assert set(plan.completed) <= set(plan.selected)
        dropped += len(plan.selected) - len(plan.completed)
        assert plan == make("availability.model=daily", "availability.dropout=0.3",
                            "client_selection=uniform", "clients_per_round=20").plan(round_num)
    selected = sum(len(model.plan(r).selected) for r in range(1, 50))
    assert dropped / selected == pytest.approx(0.3, abs=0.06)


@pytest.mark.unit
def test_rounds_with_too_few_clients_are_skipped():
    model = make("availability.model=daily", "availability.dropout=0.9", "availability.min_clients=5",
                 "clients_per_round=10")
    plans = [model.plan(r) for r in range(1, 30)]
    assert any(p.skipped for p in plans)
    assert all(p.skipped == (len(p.completed) < 5) for p in plans)


@pytest.mark.unit
def test_min_clients_above_clients_per_round_is_refused():
    with pytest.raises(config_lib.ConfigError, match="availability.min_clients"):
        config_lib.load(None, ["availability.min_clients=11"])


def test_training_with_dropouts_and_skipped_rounds_keeps_every_round_consistent(tmp_path):
    from fedmnist.outputs.metrics_log import MetricsLog

    config = config_lib.load(None, ["data.dataset=synthetic", "data.num_clients=12", "clients_per_round=6",
                                    "rounds=6", "preprocess.epochs=1", "client_selection=uniform",
                                    "availability.model=daily", "availability.round_minutes=240",
                                    "availability.dropout=0.5", "availability.min_clients=3"])
    quiet_train(config, tmp_path)
    rows = MetricsLog(tmp_path).rows()
    assert [row["round"] for row in rows] == list(range(1, 7))
    for row in rows:
        report = row["participation"]
        assert report["completed"] + report["dropped"] == report["selected"] <= report["available"]
        assert ("train" in row) == (not report["skipped"])
        if "train" in row:
            assert row["clients"] and report["completed"] == len(row["clients"])
    assert any(r["participation"]["dropped"] for r in rows)
