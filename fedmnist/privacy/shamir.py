"""Shamir's t-of-n secret sharing over a prime field, for 32-byte secrets (keys and seeds).

A secret s is the constant term of a random polynomial f of degree t - 1 over GF(p); participant i
(numbered from 1) holds the share (i, f(i)). Any t shares give s back by Lagrange interpolation at 0;
fewer than t reveal nothing about it. p is the smallest prime above 2^256, so every 32-byte string
is a field element. t must be at least 2: with t = 1, f is the constant s and every share is the
secret itself.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Iterable, Mapping

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33  # a field element below 2^257

Entropy = Callable[[int], bytes]


class NotEnoughSharesError(ValueError):
    """Fewer shares than the threshold: the secret cannot be reconstructed."""


def check_threshold(threshold: int) -> None:
    """ValueError unless `threshold` >= 2: a threshold of 1 makes every share equal to the secret."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Integral) or threshold < 2:
        raise ValueError(f"threshold {threshold!r} must be an integer of at least 2: with a threshold of 1 "
                         f"every share is the secret itself")


def split(secret: bytes, threshold: int, participants: Iterable[int],
          entropy: Entropy = os.urandom) -> dict[int, int]:
    """The shares of `secret` for each participant number (>= 1), any `threshold` of which recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    participants = list(participants)
    check_threshold(threshold)
    if threshold > len(participants):
        raise ValueError(f"threshold {threshold} is more than the {len(participants)} participants")
    if min(participants) < 1 or max(participants) >= PRIME or len(set(participants)) != len(participants):
        raise ValueError("participants must be distinct numbers from 1")
    # Coefficients from 64 random bytes each, reduced mod p: the bias is below 2^-250.
    coefficients = [int.from_bytes(secret, "big")] + [
        int.from_bytes(entropy(64), "big") % PRIME for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in participants}


def combine(shares: Mapping[int, int], threshold: int) -> bytes:
    """The secret from at least `threshold` shares `{participant: value}`."""
    check_threshold(threshold)
    if len(shares) < threshold:
        raise NotEnoughSharesError(f"{len(shares)} shares, {threshold} needed")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (x_i, y_i) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (x_j, _) in enumerate(points):
            if i != j:
                numerator = numerator * -x_j % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares are inconsistent: they do not encode a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):  # Horner's rule
        result = (result * x + coefficient) % PRIME
    return result
