"""The discrete pieces of distributed DP: the discrete Gaussian sampler, conditional randomized rounding,
and the inflation term of a sum of discrete Gaussians.

- Sampler: Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
  Algorithm 3 (rejection from a discrete Laplace of scale floor(sigma) + 1), vectorized. Like TFF's
  sampler it draws the Bernoulli acceptances with floating-point exponentials, not the paper's exact
  rational arithmetic.
- Rounding: Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning with
  Secure Aggregation", ICML 2021, Algorithm 1 and Proposition 22: stochastic rounding repeated until the
  rounded vector's L2 norm is within a bound fixed in advance, so the sensitivity after rounding is that
  bound, not a probabilistic one.
- tau: the same paper's Theorem 1, how far a sum of n discrete Gaussians is from one discrete Gaussian.
"""

from __future__ import annotations

import math

import numpy as np

BETA = math.exp(-0.5)  # conditional rounding's bias parameter (KLS21 Prop. 22; TFF's default)


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of N_Z(0, sigma^2): P(x) proportional to exp(-x^2 / (2 sigma^2)) on the integers."""
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # the geometric law whose two-sided difference is Laplace_Z(t)
    out = np.empty(size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        m = todo.size
        y = rng.geometric(p, m).astype(np.int64) - rng.geometric(p, m).astype(np.int64)
        accept = rng.random(m) < np.exp(-np.square(np.abs(y) - sigma**2 / t) / (2 * sigma**2))
        out[todo[accept]] = y[accept]
        todo = todo[~accept]
    return out


def rounded_bound(norm: float, dim: int, beta: float = BETA) -> float:
    """The L2 norm conditional rounding keeps a vector of norm <= `norm` in `dim` coordinates within
    (KLS21 Prop. 22): the smaller of the conditional bound and the deterministic (norm + sqrt(dim))."""
    conditional = math.sqrt(
        norm**2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (norm + math.sqrt(dim) / 2)
    )
    return min(conditional, norm + math.sqrt(dim))


def conditional_round(x: np.ndarray, bound: float, rng: np.random.Generator, tries: int = 1000) -> np.ndarray:
    """x (float) stochastically rounded to integers, redrawn until the result's L2 norm is <= bound. With
    bound = rounded_bound(||x||, dim) each draw succeeds with probability >= 1 - beta (Prop. 22)."""
    floor = np.floor(x)
    frac = x - floor
    for _ in range(tries):
        rounded = (floor + (rng.random(x.shape) < frac)).astype(np.int64)
        if float(np.sqrt(np.sum(np.square(rounded, dtype=np.float64)))) <= bound:
            return rounded
    raise ValueError(f"no rounding within L2 norm {bound:g} in {tries} tries (is ||x|| within the bound?)")


def tau(sigma: float, n: int) -> float:
    """KLS21 Theorem 1's tau for n clients each adding N_Z(0, sigma^2): the sum's distance from one discrete
    Gaussian, which enters the RDP bound as tau x dim (Prop. 14, first term)."""
    return 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, n))
