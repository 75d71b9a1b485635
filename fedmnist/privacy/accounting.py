"""The privacy spent by `aggregation: dp`, accounted with `dp_accounting`."""

from __future__ import annotations

import math

from fedmnist import config as config_lib


def dp_epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` of the Gaussian mechanism on a `sampling_rate` sample of clients.

    Uniform sampling of K of N clients is accounted as Poisson sampling with q = K / N (as TFF's
    DP tutorial does), with the RDP accountant of `dp_accounting`.
    """
    import dp_accounting

    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds)
    return float(dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta))


def dp_delta(settings: config_lib.DPConfig, num_clients: int) -> float:
    return settings.delta if settings.delta is not None else 1.0 / num_clients ** 1.1
