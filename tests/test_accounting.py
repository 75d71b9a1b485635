"""Differential-privacy accounting (fedmnist.privacy.accounting): epsilon over rounds, noise and sampling."""

import math

import pytest

from fedmnist import config as config_lib
from fedmnist.privacy.central_dp import DPConfig
from fedmnist.privacy.accounting import Sampling, dp_delta, dp_epsilon

pytestmark = pytest.mark.unit


def test_dp_epsilon_follows_rounds_noise_and_sampling():
    sampled = Sampling("poisson", 0.1)
    base = dp_epsilon(1.0, sampled, 10, 1e-5)
    assert dp_epsilon(1.0, sampled, 20, 1e-5) > base
    assert dp_epsilon(2.0, sampled, 10, 1e-5) < base
    assert dp_epsilon(1.0, Sampling("poisson", 0.01), 10, 1e-5) < base
    assert dp_epsilon(1.0, Sampling("public", 1.0), 10, 1e-5) > base  # no amplification
    assert dp_epsilon(0.0, sampled, 10, 1e-5) == math.inf


def test_dp_delta_defaults_to_a_hundredth_over_the_population():
    assert dp_delta(DPConfig(), 20) == pytest.approx(0.01 / 20)
    assert dp_delta(DPConfig(delta=1e-3), 20) == 1e-3
