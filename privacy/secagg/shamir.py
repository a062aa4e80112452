"""Shamir t-of-m secret sharing over the prime field GF(p), p = 2^127 - 1 (a Mersenne prime).

A secret ``s`` in [0, p) is hidden as the constant term of a random polynomial ``f`` of
degree ``t - 1``; the share of the holder with field point ``x != 0`` is ``f(x)``. Any ``t``
shares determine ``f`` and so ``s`` (Lagrange interpolation at 0); any ``t - 1`` shares are
consistent with every secret, each equally likely, so they carry no information about it.

Holders' points are ``x = client_id + 1`` (client ids are < 2^64, so the points are
distinct and non-zero). Secrets of the protocol are 127-bit seeds, shares are serialised
as 16 bytes big-endian.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

from .crypto import SecureRNG

__all__ = ["PRIME", "SHARE_BYTES", "ShamirError", "split", "reconstruct", "share_to_bytes", "share_from_bytes",
           "point_of"]

PRIME = 2**127 - 1
SHARE_BYTES = 16


class ShamirError(ValueError):
    """Bad input to sharing or reconstruction."""


def point_of(client_id: int) -> int:
    return int(client_id) + 1


def split(secrets_: Sequence[int], points: Sequence[int], threshold: int, rng: SecureRNG) -> list[list[int]]:
    """Shares of each secret for each point: ``out[i][j] = f_i(points[j])``."""
    t = int(threshold)
    if not 1 <= t <= len(points):
        raise ShamirError(f"threshold must be in [1, number of holders={len(points)}]. You passed: {threshold}")
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise ShamirError("share points must be distinct and in (0, p)")
    out = []
    for s in secrets_:
        if not 0 <= s < PRIME:
            raise ShamirError("secrets must be in [0, p)")
        coeffs = [rng.randbelow(PRIME) for _ in range(t - 1)]
        row = []
        for x in points:
            acc = 0
            for c in reversed(coeffs):  # Horner, highest degree first
                acc = (acc + c) * x % PRIME
            row.append((acc + s) % PRIME)
        out.append(row)
    return out


@lru_cache(maxsize=4096)
def _weights_at_zero(points: tuple[int, ...]) -> tuple[int, ...]:
    ws = []
    for j, xj in enumerate(points):
        num, den = 1, 1
        for m, xm in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        ws.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(ws)


def reconstruct(shares: Sequence[tuple[int, int]], threshold: int) -> int:
    """The secret from ``(point, share)`` pairs; uses the first ``threshold`` of them.

    Raises :class:`ShamirError` if fewer than ``threshold`` shares are given or points repeat.
    With fewer than ``threshold`` shares the secret is information-theoretically hidden, so no
    routine could do better; interpolating them anyway gives an unrelated value.
    """
    t = int(threshold)
    if len(shares) < t:
        raise ShamirError(f"need {t} shares to reconstruct, got {len(shares)}")
    pts = tuple(int(x) for x, _ in shares[:t])
    if len(set(pts)) != t or any(not 0 < x < PRIME for x in pts):
        raise ShamirError("share points must be distinct and in (0, p)")
    ws = _weights_at_zero(pts)
    return sum(w * int(y) for w, (_, y) in zip(ws, shares[:t])) % PRIME


def share_to_bytes(values: Sequence[int]) -> bytes:
    return b"".join(int(v).to_bytes(SHARE_BYTES, "big") for v in values)


def share_from_bytes(raw: bytes, *, what: str = "shares") -> list[int]:
    if len(raw) % SHARE_BYTES:
        raise ShamirError(f"{what}: length {len(raw)} is not a multiple of {SHARE_BYTES}")
    vals = [int.from_bytes(raw[i:i + SHARE_BYTES], "big") for i in range(0, len(raw), SHARE_BYTES)]
    if any(v >= PRIME for v in vals):
        raise ShamirError(f"{what}: a share is not a field element (>= 2^127 - 1)")
    return vals
