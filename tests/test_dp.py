"""`aggregation: dp`: the epsilon printed is the epsilon of the sampling that ran, and the sample is secret."""

from __future__ import annotations

import math
import re
from pathlib import Path

import dp_accounting
import numpy as np
import pytest

from fedmnist import config as config_lib
from fedmnist.privacy.central_dp import CentralDp, DPConfig
from fedmnist.clients.participation import Participation
from fedmnist.privacy import accounting
from fedmnist.privacy.accounting import Sampling

NOTEBOOK = dict(noise_multiplier=0.5, rounds=10, delta=0.037)  # the privacy notebook's former settings


def rdp_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


@pytest.mark.unit
@pytest.mark.parametrize("z, q, rounds, delta", [(0.5, 0.5, 10, 0.037), (1.1, 0.01, 500, 1e-6)])
def test_poisson_epsilon_is_dp_accountings_for_poisson_sampled_gaussian_rounds(z, q, rounds, delta):
    expected = rdp_epsilon(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds), delta)
    assert accounting.dp_epsilon(z, Sampling("poisson", q), rounds, delta) == pytest.approx(expected, rel=1e-12)
    # An independent accountant: privacy-loss distributions are tighter than RDP, never looser.
    pld = dp_accounting.pld.PLDAccountant().compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)).get_epsilon(delta)
    assert pld <= expected <= 2 * pld


@pytest.mark.unit
def test_a_public_sample_is_accounted_without_amplification():
    public = accounting.dp_epsilon(0.5, Sampling("public", 1.0), 10, 0.037)
    assert public == pytest.approx(rdp_epsilon(dp_accounting.SelfComposedDpEvent(
        dp_accounting.GaussianDpEvent(0.5), 10), 0.037), rel=1e-12)
    assert public == pytest.approx(34.14, abs=0.01)  # the q = 1 figure of the review
    secret = accounting.dp_epsilon(0.5, Sampling("poisson", 0.5), 10, 0.037)
    assert secret == pytest.approx(19.07, abs=0.01) and secret < public
    assert accounting.dp_epsilon(0.0, Sampling("poisson", 0.5), 10, 0.037) == math.inf


def dp_config(*extra: str) -> config_lib.Config:
    return config_lib.load(None, ["data.dataset=digits", "aggregation=dp", "client_selection=uniform", *extra])


def planner(config, ids) -> Participation:
    """The round planner a dp run uses: the sampling its aggregation mode asks for."""
    return Participation(config, ids, CentralDp(config).secret_sample_rate(len(ids)))


@pytest.mark.unit
def test_the_sampling_that_runs_is_poisson_at_the_accounted_rate_and_unseeded():
    config = dp_config()
    ids = [f"client_{i:02d}" for i in range(20)]
    sampling = accounting.sampling_for(config, len(ids))
    assert sampling == Sampling("poisson", 0.5)
    plans = [planner(config, ids).plan(r) for r in range(1, 2001)]
    sizes = np.array([len(p.completed) for p in plans])
    # Binomial(20, 0.5) sizes, not a fixed 10: mean 10, standard deviation sqrt(5).
    assert abs(sizes.mean() - 10) < 4 * math.sqrt(5 / len(sizes))
    assert sizes.std() == pytest.approx(math.sqrt(5), rel=0.1)
    inclusion = np.array([[cid in p.completed for cid in ids] for p in plans]).mean(axis=0)
    assert np.all(np.abs(inclusion - 0.5) < 4 * math.sqrt(0.25 / len(plans)))
    # Not a function of the seed: two planners with one config draw different samples.
    again = [planner(config, ids).plan(r).completed for r in range(1, 21)]
    assert again != [p.completed for p in plans[:20]]
    assert all(p.public_ids() == [] and "selected" not in p.report() for p in plans)


@pytest.mark.unit
def test_a_public_sample_is_the_seeded_one_with_ids_and_q_1():
    config = dp_config("dp.public_sample=true")
    ids = [f"client_{i:02d}" for i in range(20)]
    assert accounting.sampling_for(config, len(ids)) == Sampling("public", 1.0)
    first, second = planner(config, ids).plan(3), planner(config, ids).plan(3)
    assert first.completed == second.completed and len(first.completed) == 10
    assert first.public_ids() == first.completed


@pytest.mark.unit
def test_dp_with_availability_is_refused():
    with pytest.raises(config_lib.ConfigError, match="availability.model: always"):
        dp_config("availability.model=daily")


@pytest.mark.unit
def test_default_delta_is_meaningful_and_a_weak_one_is_named():
    assert accounting.dp_delta(DPConfig(), 20) * 20 == pytest.approx(0.01)
    assert accounting.delta_warning(accounting.dp_delta(DPConfig(), 20), 20) is None
    warning = accounting.delta_warning(0.037, 20)
    assert warning.startswith("warning: dp.delta 0.037 x 20 clients = 0.74") and "\n" not in warning


def test_a_dp_run_spends_the_accounted_epsilon_and_never_names_its_clients(tmp_path):
    from fedmnist import loop

    lines: list[str] = []
    summary = loop.train(dp_config("rounds=3", "histogram_every=0", "centralized_eval_every=3"), tmp_path,
                         echo=lines.append, progress=False)

    report = summary["aggregation"]
    assert report["sampling"] == "poisson" and report["sampling_rate"] == 0.5
    expected = rdp_epsilon(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.5, dp_accounting.GaussianDpEvent(0.5)), 3), report["delta"])
    assert report["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert "not covered" in report["covers"]
    assert all(line.endswith("(not covered by the DP guarantee)")
               for line in lines if line.startswith(("round  1, local training", "evaluation on", "centralized")))
    # The digits' pooled test set is the clients' test data: its centralized evaluation is not covered either.
    assert any(line.startswith("centralized") for line in lines)
    # The secret sample appears nowhere: logs, TensorBoard, checkpoints, summary.
    for path in Path(tmp_path).rglob("*"):
        if path.is_file() and path.suffix != ".png":
            assert not re.search(rb"client_\d\d", path.read_bytes()), path.relative_to(tmp_path)
    # Nor its size: no per-round figure that counts the participants' data or time (federated evaluation,
    # on the fixed evaluation clients, keeps its counts).
    from helpers import metrics_rows, scalars

    rows = metrics_rows(tmp_path)
    assert rows and all(set(r["train"]) == {"loss", "sparse_categorical_accuracy"} and "seconds" not in r
                        and set(r["participation"]) == {"sampling"} for r in rows)
    tags = set(scalars(tmp_path))
    assert {"loss/local_training", "accuracy/local_training"} <= tags
    assert not {t for t in tags if t.startswith(("round/local_training/", "round/seconds"))}
    assert set(summary["local_training"]) == {"loss", "sparse_categorical_accuracy"}
    assert not any(re.search(r"num_examples|num_batches|skipped", line) for line in lines if line.startswith("round"))
