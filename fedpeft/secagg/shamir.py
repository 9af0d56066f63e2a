"""Shamir secret sharing of byte strings over GF(p), p = 2^31 - 1, vectorized with numpy.

A secret of B bytes is split into B/2 16-bit limbs; every limb is shared with its own random
polynomial of degree t-1 (all at the same evaluation points), so one share is a vector of limbs.
Any t shares reconstruct the secret; t-1 shares are consistent with every secret (information-
theoretic), which is what protects a client's self-mask seed and mask key.
Products of two field elements stay below 2^62, so int64 arithmetic is exact.
"""

from __future__ import annotations

import secrets

import numpy as np

P = 2**31 - 1  # a Mersenne prime; 16-bit limbs are field elements


def _limbs(secret: bytes) -> np.ndarray:
    if len(secret) % 2:
        raise ValueError("secret length must be even")
    return np.frombuffer(secret, dtype="<u2").astype(np.int64)


def split(secret: bytes, points: list[int], t: int) -> dict[int, np.ndarray]:
    """Shares {x: limbs} of `secret` at the distinct non-zero points `points`; any t reconstruct it."""
    if not 1 <= t <= len(points):
        raise ValueError(f"threshold {t} out of range for {len(points)} shares")
    if len(set(points)) != len(points) or any(not 0 < x < P for x in points):
        raise ValueError("share points must be distinct and in (0, p)")
    limbs = _limbs(secret)
    raw = np.frombuffer(secrets.token_bytes(8 * (t - 1) * len(limbs)), dtype="<u8").reshape(t - 1, len(limbs))
    coeffs = np.vstack([limbs[None, :], (raw % P).astype(np.int64)])  # [t, L]: c_0 = the secret
    shares = {}
    for x in points:
        acc = np.zeros(len(limbs), dtype=np.int64)
        for c in coeffs[::-1]:  # Horner
            acc = (acc * x + c) % P
        shares[x] = acc
    return shares


def _lagrange_at_zero(xs: list[int]) -> list[int]:
    out = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % P
                den = den * (xm - xj) % P
        out.append(num * pow(den, P - 2, P) % P)
    return out


def combine(shares: dict[int, np.ndarray], t: int) -> bytes:
    """The secret from at least t shares (the first t by point are used). Raises ValueError if fewer
    are given or if the result is not a valid byte string (malformed shares)."""
    if len(shares) < t:
        raise ValueError(f"{len(shares)} shares, {t} needed")
    xs = sorted(shares)[:t]
    lengths = {len(shares[x]) for x in xs}
    if len(lengths) != 1:
        raise ValueError("shares of different lengths")
    acc = np.zeros(lengths.pop(), dtype=np.int64)
    for lam, x in zip(_lagrange_at_zero(xs), xs, strict=True):
        acc = (acc + lam * (np.asarray(shares[x], dtype=np.int64) % P)) % P
    if np.any(acc >= 2**16):
        raise ValueError("shares do not reconstruct a valid secret")
    return acc.astype("<u2").tobytes()


def encode_share(limbs: np.ndarray) -> bytes:
    return np.asarray(limbs, dtype="<u4").tobytes()


def decode_share(data: bytes, limbs: int) -> np.ndarray:
    if len(data) != 4 * limbs:
        raise ValueError(f"share of {len(data)} bytes, expected {4 * limbs}")
    return np.frombuffer(data, dtype="<u4").astype(np.int64)
