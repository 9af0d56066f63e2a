"""Central DP-FedAvg (McMahan et al., ICLR 2018, Algorithm 1 with the fixed-denominator estimator): clip on
the client, noise on the server, and the Poisson sample that the accountant assumes.

The noise and the sample come from the operating system's entropy, never from --seed: noise anyone could
regenerate from a seed in config.json protects nothing, and the sampling amplification needs a sample the
adversary cannot predict. numpy's float Gaussian is what Opacus and TF Privacy use outside their secure
modes; its floating-point artefacts (Mironov, CCS 2012) are a known limit of central float noise.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]  # named arrays, as fedpeft.federation.aggregate sums them


def l2_norm(arrays: Arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))


def clip(delta: Arrays, bound: float) -> tuple[Arrays, bool]:
    """The whole delta (every tensor together) scaled to L2 norm at most `bound`; whether it was scaled."""
    norm = l2_norm(delta)
    if norm <= bound:
        return delta, False
    scale = bound / norm
    return {k: (a * scale).astype(a.dtype) for k, a in delta.items()}, True


def poisson_sample(clients: Sequence[int], q: float) -> list[int]:
    """Each client independently with probability q (secret randomness: see the module docstring)."""
    rng = np.random.default_rng(secrets.randbits(128))
    return [c for c in clients if rng.random() < q]


def noised_mean(total: Arrays, expected_clients: float, noise_std: float) -> Arrays:
    """(sum of clipped deltas + N(0, noise_std^2) per coordinate) / expected number of clients (q x N): the
    fixed denominator keeps the sensitivity at clip / (qN) whatever the sample's size."""
    rng = np.random.default_rng(secrets.randbits(128))
    return {
        k: ((a.astype(np.float64) + rng.normal(0.0, noise_std, a.shape)) / expected_clients).astype(a.dtype)
        for k, a in total.items()
    }
