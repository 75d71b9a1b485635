"""Which clients take part in a round: availability by time of day, selection, dropouts.

The article's phones train only when idle, charging and on Wi-Fi. With `availability.model: daily`
every client gets an archetype (a probability of being available for each hour of a simulated day,
shifted by up to an hour per client), each round advances a simulated clock, only available clients
can be selected, and selected clients drop out with `availability.dropout` probability (their
update is lost). With `always` (the article) every client is available and none drops out.

Every random draw is keyed by (seed, round), so a round's plan is the same in a resumed run, except
with a secret sample (`secret_rate`, which `aggregation: dp` asks for unless `dp.public_sample`): there
each client takes part with that probability, drawn from the operating system's CSPRNG, and the
plan's `public_ids()` and `report()` do not reveal who (fedmnist/privacy/accounting.py).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

import numpy as np
import tensorflow_federated as tff

from fedmnist.config import AvailabilityConfig, Config

HOURS = np.arange(24)
# Probability of being idle, charging and on Wi-Fi, by hour of the day.
ARCHETYPES: dict[str, np.ndarray] = {
    "night_charger": np.where((HOURS >= 23) | (HOURS < 7), 0.9, 0.05),
    "daytime": np.where((HOURS >= 9) & (HOURS < 17), 0.7, 0.05),
    "always_on": np.full(24, 0.95),
}


@dataclasses.dataclass
class RoundPlan:
    round_num: int
    clock_hours: float
    available: int
    selected: list[str]
    completed: list[str]
    skipped: bool
    secret: bool = False

    def public_ids(self) -> list[str]:
        """The clients a log may name: none when the sample is secret."""
        return [] if self.secret else list(self.completed)

    def report(self) -> dict:
        if self.secret:
            return {"sampling": "poisson (secret)"}
        return {"available": self.available, "selected": len(self.selected),
                "completed": len(self.completed), "dropped": len(self.selected) - len(self.completed),
                "clock_hours": self.clock_hours, "skipped": self.skipped}


class Participation:
    """Plans each round's clients from the config: `clients_per_round` of `client_ids`, the first ones
    (`client_selection: fixed`) or a seeded uniform sample, among those available; `plan(round_num)` is
    deterministic unless `secret_rate` asks for a secret Poisson sample."""

    def __init__(self, config: Config, client_ids: Sequence[str], secret_rate: float | None = None):
        self.ids = list(client_ids)
        self.count = config.clients_per_round
        self.selection = config.client_selection
        self.seed = config.seed
        self.cfg: AvailabilityConfig = config.availability
        rng = np.random.default_rng([self.seed, 7])
        shares = np.array([self.cfg.night_charger_share, self.cfg.daytime_share, self.cfg.always_on_share])
        self.archetypes = rng.choice(list(ARCHETYPES), size=len(self.ids), p=shares / shares.sum())
        self.shift = rng.integers(-1, 2, size=len(self.ids))
        self._uniform = tff.simulation.build_uniform_sampling_fn(self.ids, replace=False, random_seed=self.seed)
        self.secret_rate = secret_rate

    def clock_hours(self, round_num: int) -> float:
        return self.cfg.start_hour + (round_num - 1) * self.cfg.round_minutes / 60

    def availability_probability(self, round_num: int) -> np.ndarray:
        if self.cfg.model == "always":
            return np.ones(len(self.ids))
        hour = (int(self.clock_hours(round_num)) + self.shift) % 24
        return np.array([ARCHETYPES[a][h] for a, h in zip(self.archetypes, hour)])

    def available(self, round_num: int) -> list[str]:
        if self.cfg.model == "always":
            return self.ids
        draws = np.random.default_rng([self.seed, 11, round_num]).random(len(self.ids))
        return [cid for cid, draw, p in zip(self.ids, draws, self.availability_probability(round_num)) if draw < p]

    def select(self, round_num: int, available: list[str]) -> list[str]:
        if self.secret_rate is not None:
            draw = secrets.SystemRandom()
            return [cid for cid in available if draw.random() < self.secret_rate]
        if self.selection == "fixed":
            return available[:self.count]
        if len(available) == len(self.ids):
            return [str(c) for c in self._uniform(round_num, self.count)]
        rng = np.random.default_rng([self.seed, 12, round_num])
        return sorted(rng.choice(available, size=min(self.count, len(available)), replace=False).tolist())

    def upcoming(self, round_num: int) -> list[str]:
        """The clients that will train in `round_num`, when that can be known before it starts: none for a
        secret sample (drawn when its round starts, and only then) or a round that will be skipped."""
        if self.secret_rate is not None:
            return []
        plan = self.plan(round_num)
        return [] if plan.skipped else plan.completed

    def plan(self, round_num: int) -> RoundPlan:
        available = self.available(round_num)
        selected = self.select(round_num, available)
        drops = np.random.default_rng([self.seed, 13, round_num]).random(len(selected)) < self.cfg.dropout
        completed = [cid for cid, dropped in zip(selected, drops) if not dropped]
        secret = self.secret_rate is not None
        # A secret sample is never skipped: an empty one still releases the mechanism's noise, as the
        # accounting assumes, and a skip would tell who took part (none).
        return RoundPlan(round_num, self.clock_hours(round_num), len(available), selected, completed,
                         skipped=not secret and len(completed) < self.cfg.min_clients, secret=secret)
