"""The privacy spent by `aggregation: dp` (secure_dp: fedmnist/privacy/distributed_accounting.py), accounted with `dp_accounting` for the sampling that ran.

Two samplings, each accounted as what it is:

- `poisson` (default): every round each client takes part independently with probability
  q = clients_per_round / num_clients, drawn from the operating system's CSPRNG, and the sample stays
  secret (no client ids are logged). TFF's `dp_aggregator` divides by the expected number of clients
  and its noise is calibrated to one client's clipped update (add/remove adjacency), which is what
  `PoissonSampledDpEvent(q, GaussianDpEvent(z))` accounts.
- `public` (`dp.public_sample: true`): the seeded, fixed-size sample the other modes use, with client
  ids in `metrics.jsonl`. A sample everyone can see or recompute gives no amplification, so it is
  accounted with q = 1: `GaussianDpEvent(z)` every round.

The noise multiplier z is TFF's effective one: `dp_aggregator` splits it between the update and the
adaptive clipping's quantile estimate so that together they equal z.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import dp_accounting

if TYPE_CHECKING:
    from fedmnist.config import Config

# The default delta is this divided by the number of clients: a mechanism that published one random
# client's data whole would still meet delta, so delta x N must be well below 1 to mean anything.
DEFAULT_DELTA_TIMES_CLIENTS = 0.01
WARN_DELTA_TIMES_CLIENTS = 0.1


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a dp run samples its clients: `kind` is `poisson` (secret) or `public`; `rate` is the q the
    accountant uses."""

    kind: str
    rate: float

    def describe(self) -> str:
        if self.kind == "poisson":
            return f"Poisson sampling, q = {self.rate:.3g}, secret sample"
        return "public seeded sample, accounted with q = 1 (no amplification)"


def sampling_for(config: Config, num_clients: int) -> Sampling:
    if config.dp.public_sample:
        return Sampling("public", 1.0)
    return Sampling("poisson", min(1.0, config.clients_per_round / num_clients))


def dp_event(noise_multiplier: float, sampling: Sampling, rounds: int) -> dp_accounting.DpEvent:
    """The event that `rounds` rounds of the Gaussian mechanism under `sampling` are."""
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    per_round = gaussian if sampling.rate >= 1.0 else dp_accounting.PoissonSampledDpEvent(sampling.rate, gaussian)
    return dp_accounting.SelfComposedDpEvent(per_round, rounds)


def dp_epsilon(noise_multiplier: float, sampling: Sampling, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds, with the RDP accountant of `dp_accounting`."""
    if noise_multiplier == 0:
        return math.inf
    accountant = dp_accounting.rdp.RdpAccountant()
    return float(accountant.compose(dp_event(noise_multiplier, sampling, rounds)).get_epsilon(delta))


def dp_delta(settings, num_clients: int) -> float:
    """`settings.delta` (a `dp:` or `secure_dp:` section), by default 0.01 / `num_clients`."""
    return settings.delta if settings.delta is not None else DEFAULT_DELTA_TIMES_CLIENTS / num_clients


def delta_warning(delta: float, num_clients: int, key: str = "dp.delta") -> str | None:
    """One line when delta is too large for `num_clients` to mean much."""
    if delta * num_clients < WARN_DELTA_TIMES_CLIENTS:
        return None
    return (f"warning: {key} {delta:.3g} x {num_clients} clients = {delta * num_clients:.2g}: a guarantee "
            f"this weak allows revealing some client's data outright; use a delta below "
            f"{WARN_DELTA_TIMES_CLIENTS / num_clients:.2g}")
