"""The privacy spent by `aggregation: secure_dp`: Renyi DP of the distributed mechanism that ran, composed
over rounds and converted to (epsilon, delta) with `dp_accounting.rdp.compute_epsilon`.

What is accounted, per round:
- the worst case the protocol allows: only `threshold` clients' noise shares reach the sum (more
  dropouts abort the round), each of standard deviation `scaled_local_stddev` in the scaled domain;
- neighbouring inputs differ in one client's update (its noise share stays), whose rounded, scaled
  vector has L2 norm at most `l2_sensitivity` and L1 norm at most `l1_sensitivity` (TFF's bounds);
- no amplification by sampling: the server runs the protocol with the round's participants, so it
  knows who took part (q = 1).

Bounds (orders: integers, as the authors' accounting code in google-research/federated
distributed_dp/accounting_utils.py evaluates them):
- distributed Skellam (Agarwal, Kairouz, Liu, NeurIPS 2021, arXiv:2110.04995, the multi-dimensional
  Skellam RDP bound): with mu the variance of the summed noise,
      eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu)).
  Sums of Skellam shares are Skellam, so mu = threshold x scaled_local_stddev^2 exactly.
- distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021, arXiv:2102.06387, Theorem 1 in its
  RDP form, Proposition 14 / Eq. 17): n shares of N_Z(0, s^2), tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k/(k+1)),
      eps(a) = min(a D2^2 / (2 n s^2) + tau d,
                   a/2 (D2^2 / (n s^2) + 2 D1 tau / (sqrt(n) s) + tau^2 d),
                   a/2 (D2 / (sqrt(n) s) + tau sqrt(d))^2).
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np

from fedmnist.privacy.distributed_dp import DdpParameters

# Integer orders, as the authors' accounting code evaluates these bounds. It is a coarser grid than
# dp_accounting's default (which has fractional orders near 1), so epsilon can only err high; at large
# epsilons, whose best order is small, by several percent (notebooks/privacy.ipynb).
ORDERS = tuple(range(2, 257)) + (512, 1024)


def skellam_rdp(order: float, l1: float, l2: float, variance: float) -> float:
    """RDP at `order` of adding Skellam noise of `variance` to integer vectors with the given sensitivities."""
    a = order
    return a * l2 ** 2 / (2 * variance) + min(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                                              3 * l1 / (2 * variance))


def dgauss_tau(local_stddev: float, num_clients: int) -> float:
    """Kairouz et al.'s tau: how far a sum of `num_clients` discrete Gaussians is from one."""
    return 10 * sum(math.exp(-2 * math.pi ** 2 * local_stddev ** 2 * k / (k + 1)) for k in range(1, num_clients))


def dgauss_rdp(order: float, l1: float, l2: float, local_stddev: float, num_clients: int, dim: int) -> float:
    """RDP at `order` of the sum of `num_clients` discrete Gaussian shares of `local_stddev` each."""
    a, tau = order, dgauss_tau(local_stddev, num_clients)
    l1_scale = l1 / (math.sqrt(num_clients) * local_stddev)
    l2_scale = l2 / (math.sqrt(num_clients) * local_stddev)
    return min(a / 2 * l2_scale ** 2 + tau * dim,
               a / 2 * (l2_scale ** 2 + 2 * l1_scale * tau + tau ** 2 * dim),
               a / 2 * (l2_scale + math.sqrt(dim) * tau) ** 2)


def round_rdp(params: DdpParameters) -> np.ndarray:
    """One round's RDP at each of ORDERS, for the worst case of `threshold` surviving noise shares."""
    sigma, n = params.scaled_local_stddev, params.threshold
    if params.mechanism == "distributed_skellam":
        return np.array([skellam_rdp(a, params.l1_sensitivity, params.l2_sensitivity, n * sigma ** 2)
                         for a in ORDERS])
    return np.array([dgauss_rdp(a, params.l1_sensitivity, params.l2_sensitivity, sigma, n, params.padded_dim)
                     for a in ORDERS])


def ddp_epsilon(params: DdpParameters, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds (inf without noise)."""
    if params.noise_multiplier == 0 or rounds == 0:
        return math.inf if rounds else 0.0
    epsilon, _ = dp_accounting.rdp.compute_epsilon(ORDERS, rounds * round_rdp(params), delta)
    return float(epsilon)
