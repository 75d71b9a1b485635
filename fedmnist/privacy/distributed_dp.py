"""Distributed differential privacy under secure aggregation (`aggregation: secure_dp`): each client
noises its own quantized update, and the server unmasks only the noised sum.

TFF 0.87 ships the mechanism as `DistributedDpSumFactory` (`tff.learning.ddp_secure_aggregator`;
tensorflow_federated/python/aggregators/distributed_dp.py, not exported under `tff.aggregators`), but
in simulation its secure sum is a plain sum. Here each client runs its encoding steps, in TFF's order
(`_build_aggregation_factory`), and the secure sum is fedmnist's protocol (`secagg.run_protocol`):

    client: flatten, clip to L2 norm `clip`, randomized Hadamard rotation (signs from a public
            per-round seed; zero-padded to a power of 2), times `scale`, randomized rounding to
            integers, plus its noise share, modulo 2^bits
    server: unmasked sum modulo 2^bits, to the signed range, divided by `scale`, inverse rotation,
            unpadded, divided by clients_per_round

Reused from TFF: the scale heuristic (`heuristic_scale_factor`, TFF's `_heuristic_scale_factor`
restated in numpy: the private function returns a tensor), the post-rounding L2 bound
(`discretization.inflated_l2_norm_bound`) with TFF's leeway, the L1 bound and `MAX_SCALE_FACTOR`.
The noise follows tensorflow_privacy's `DistributedSkellamSumQuery` (Poisson(s^2/2) - Poisson(s^2/2))
and `DistributedDiscreteGaussianSumQuery`, but is drawn here: those samplers, like TFF's randomized
rounding, seed from `tf.timestamp()` or TF's global seed, which a server could guess and so subtract
a client's noise; two clients drawing in the same microsecond would even add the same noise. Every
client draws from its own generator seeded by OS entropy.

Noise calibration: up to clients_per_round - threshold clients may drop out (below the threshold the
protocol aborts), so each client adds variance (noise_multiplier x clip)^2 / threshold: any threshold
survivors together already add the configured central noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import numpy as np
from scipy import special

from fedmnist.errors import ConfigError
from fedmnist.privacy import secagg

MAX_SCALE_FACTOR = 1e6  # TFF's distributed_dp.MAX_SCALE_FACTOR: larger scales overflow and do not help
L2_LEEWAY = 1e-5  # TFF's leeway on the inflated norm bound, for float32 rounding in its computation
ROTATION_SEED = 2021  # mixed with the run's seed and the round: the rotation's signs are public


class DdpSettings(Protocol):
    """What the parameters are computed from: the `secure_dp:` section (fedmnist/privacy/secure_dp.py)."""

    mechanism: str
    noise_multiplier: float
    clip: float
    bits: int
    modclip_prob: float


@dataclasses.dataclass(frozen=True)
class DdpParameters:
    """Everything one round of distributed DP is built from. Sensitivities and `scaled_local_stddev`
    are in the scaled (integer) domain; `local_stddev` is a client's noise in model units."""

    mechanism: str
    noise_multiplier: float
    clip: float
    bits: int
    clients_per_round: int
    threshold: int
    dim: int
    padded_dim: int
    k_stddevs: float
    scale: float
    local_stddev: float
    l2_sensitivity: float
    l1_sensitivity: float

    @property
    def scaled_local_stddev(self) -> float:
        return self.local_stddev * self.scale

    def summary(self) -> dict:
        return {"mechanism": self.mechanism, "noise_multiplier": self.noise_multiplier, "clip": self.clip,
                "bits": self.bits, "threshold": self.threshold, "local_stddev": self.local_stddev,
                "scaled_local_stddev": self.scaled_local_stddev, "scale": self.scale,
                "padded_dim": self.padded_dim, "l2_sensitivity": self.l2_sensitivity,
                "l1_sensitivity": self.l1_sensitivity}


def clip_prob_to_num_stddevs(clip_prob: float) -> float:
    """TFF's `_clip_prob_to_num_stddevs`: standard deviations of a normal sum outside which it wraps
    with probability `clip_prob`."""
    return math.sqrt(2) * float(special.erfcinv(clip_prob))


def heuristic_scale_factor(local_stddev: float, l2_clip: float, bits: int, num_clients: int, dim: int,
                           k_stddevs: float, rho: float = 1.0) -> float:
    """TFF's `_heuristic_scale_factor` (distributed_dp.py; Kairouz et al. 2021, Sections 4.2 and 4.4):
    the scale 1/gamma that keeps k standard deviations of the noised, rounded sum of `num_clients`
    rotated updates inside 2^bits, solving 2^b = 2k sqrt(rho/d (cn)^2 + (gamma^2/4 + sigma^2) n) / gamma.
    NaN when 2^(2b) < n k^2 (no scale fits)."""
    room = 2.0 ** (2.0 * bits) - num_clients * k_stddevs ** 2
    if room < 0:
        return math.nan
    spread = rho / dim * l2_clip ** 2 * num_clients ** 2 + num_clients * local_stddev ** 2
    return math.sqrt(room) / (2.0 * k_stddevs * math.sqrt(spread))


def inflated_l2_bound(clip: float, scale: float, padded_dim: int) -> float:
    """The L2 norm of a rounded, scaled update, as TFF bounds it (unconditional rounding, beta = 0)."""
    from tensorflow_federated.python.aggregators import discretization  # module path only in TFF 0.87

    inflated = float(discretization.inflated_l2_norm_bound(
        l2_norm_bound=clip, gamma=1.0 / scale, beta=0.0, dim=padded_dim).numpy())
    return (inflated + L2_LEEWAY) * scale


def ddp_parameters(settings: DdpSettings, clients_per_round: int, threshold: int, dim: int) -> DdpParameters:
    """The round's parameters for a model of `dim` weights; ConfigError (one line) when the bits leave too
    coarse a rounding (`check_scale`)."""
    padded = 2 ** math.ceil(math.log2(max(dim, 1)))
    k_stddevs = clip_prob_to_num_stddevs(settings.modclip_prob)
    local = settings.noise_multiplier * settings.clip / math.sqrt(threshold)
    scale = min(heuristic_scale_factor(local, settings.clip, settings.bits, clients_per_round, padded, k_stddevs),
                MAX_SCALE_FACTOR)
    check_scale(scale, settings, clients_per_round, padded)
    l2 = inflated_l2_bound(settings.clip, scale, padded)
    # Integer coordinates: L1 <= L2^2, besides L1 <= sqrt(d) L2 (TFF's scaled_l1).
    l1 = float(math.ceil(l2 * min(math.sqrt(padded), l2)))
    return DdpParameters(settings.mechanism, settings.noise_multiplier, settings.clip, settings.bits,
                         clients_per_round, threshold, dim, padded, k_stddevs, scale, local, l2, l1)


def check_scale(scale: float, settings: DdpSettings, clients_per_round: int, padded_dim: int) -> None:
    """TFF's condition, scale > 1 (it only warns), and a rounding step no coarser than a clipped update's
    typical rotated coordinate, clip / sqrt(d): else rounding would swamp the updates."""
    step, coordinate = 1.0 / scale, settings.clip / math.sqrt(padded_dim)
    if scale > 1 and step <= coordinate:
        return
    raise ConfigError(f"secure_dp.bits: {settings.bits} bits leave a rounding step of {step:.3g} for {clients_per_round} "
                      f"clients, noise multiplier {settings.noise_multiplier:g} and clip {settings.clip:g} (it must be "
                      f"below 1 and below clip/sqrt({padded_dim}) = {coordinate:.3g}); raise secure_dp.bits")


# --- The rotation ----------------------------------------------------------------------------

def hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform (H / sqrt(d), its own inverse) of a vector whose
    length is a power of 2, as TFF's `hadamard.fast_walsh_hadamard_transform`."""
    y = np.array(x, dtype=np.float64)
    d, h = len(y), 1
    while h < d:
        pairs = y.reshape(-1, 2, h)
        y = np.concatenate([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], axis=1).reshape(d)
        h *= 2
    return y / math.sqrt(d)


def rotation_signs(seed: int, round_num: int, padded_dim: int) -> np.ndarray:
    """The round's random signs: public, the same for every client and the server."""
    return np.random.default_rng([seed, ROTATION_SEED, round_num]).choice([-1.0, 1.0], size=padded_dim)


# --- The noise -------------------------------------------------------------------------------

def skellam_noise(stddev: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Skellam noise of standard deviation `stddev`: the difference of two Poisson(stddev^2 / 2)
    draws, as tensorflow_privacy's DistributedSkellamSumQuery."""
    lam = 0.5 * stddev ** 2
    return rng.poisson(lam, size) - rng.poisson(lam, size)


def discrete_gaussian_noise(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Discrete Gaussian N_Z(0, sigma^2) by rejection from a discrete Laplace of scale t = floor(sigma) + 1
    (Canonne, Kamath, Steinke 2020, Algorithm 3), vectorized; in floating point, like
    tensorflow_privacy's `sample_discrete_gaussian`."""
    if sigma <= 0:
        return np.zeros(size, dtype=np.int64)
    t = math.floor(sigma) + 1
    out, filled = np.empty(size, dtype=np.int64), 0
    while filled < size:
        batch = 2 * (size - filled) + 16
        q = -math.expm1(-1.0 / t)  # a discrete Laplace is the difference of two geometrics
        y = rng.geometric(q, batch) - rng.geometric(q, batch)
        accept = rng.random(batch) < np.exp(-((np.abs(y) - sigma ** 2 / t) ** 2) / (2 * sigma ** 2))
        kept = y[accept][:size - filled]
        out[filled:filled + len(kept)] = kept
        filled += len(kept)
    return out


# --- The encoder -----------------------------------------------------------------------------

class DistributedDpEncoder:
    """A client's vector for the secure sum and the server's mean from the unmasked sum.

    Clients are weighted uniformly (user-level DP: every client counts once); the noised sum is
    divided by clients_per_round, as TFF's dp_aggregator divides by the expected count."""

    uniform_weights = True

    def __init__(self, params: DdpParameters, seed: int = 0):
        self.params, self.seed = params, seed
        self.bits, self.length = params.bits, params.padded_dim
        self.float32_bytes = 4 * params.dim  # what TFF's unweighted float32 mean would send
        self._signs = rotation_signs(seed, 0, params.padded_dim)
        # The simulation's own bookkeeping, not the server's: the round's inputs summed before the modulus, so
        # that it can report how many coordinates of the sum wrapped around (which the server cannot see).
        self._unreduced: np.ndarray | None = None

    def begin_round(self, round_num: int) -> None:
        self._signs = rotation_signs(self.seed, round_num, self.params.padded_dim)
        self._unreduced = None

    def quantize(self, update: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Clipped, rotated, scaled and randomly rounded: integers of L2 norm at most `l2_sensitivity`."""
        update = np.asarray(update, dtype=np.float64)
        if not np.all(np.isfinite(update)):  # as TFF's client work: such a client contributes nothing
            update = np.zeros_like(update)
        padded = np.zeros(self.length)
        padded[:len(update)] = secagg.clip_l2(update, self.params.clip)
        scaled = hadamard(self._signs * padded) * self.params.scale
        floor = np.floor(scaled)
        return (floor + (rng.random(self.length) < scaled - floor)).astype(np.int64)

    def noise(self, rng: np.random.Generator) -> np.ndarray:
        """This client's share of the noise, in the scaled domain."""
        sigma = self.params.scaled_local_stddev
        if sigma == 0:
            return np.zeros(self.length, dtype=np.int64)
        if self.params.mechanism == "distributed_skellam":
            return skellam_noise(sigma, self.length, rng)
        return discrete_gaussian_noise(sigma, self.length, rng)

    def encode(self, update: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """The client's input to the secure sum: quantized update plus noise, modulo 2^bits."""
        del weight  # uniform weighting
        noised = self.quantize(update, rng) + self.noise(rng)
        self._unreduced = noised if self._unreduced is None else self._unreduced + noised
        return noised.view(np.uint64) & secagg.modulus_mask(self.bits)

    def decode(self, total: np.ndarray, senders: int) -> tuple[np.ndarray, dict]:
        """The mean update from the unmasked sum modulo 2^bits of `senders` clients' inputs."""
        signed_sum = secagg.to_signed(total, self.bits)
        wrapped = int(np.count_nonzero(signed_sum != self._unreduced)) if self._unreduced is not None else 0
        self._unreduced = None
        signed = signed_sum.astype(np.float64) / self.params.scale
        mean = (self._signs * hadamard(signed))[:self.params.dim] / self.params.clients_per_round
        return mean, {"senders": senders, "quantization_step": 1.0 / self.params.scale,
                      "noise_stddev": math.sqrt(senders) * self.params.local_stddev,
                      "wrapped_coordinates": wrapped}

