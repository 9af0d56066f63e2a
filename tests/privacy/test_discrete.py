"""fedpeft/privacy/discrete.py: the discrete Gaussian sampler against its law, conditional rounding, tau."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedpeft.privacy.discrete import conditional_round, discrete_gaussian, rounded_bound, tau


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-np.square(support.astype(np.float64)) / (2 * sigma**2))
    return weights / weights.sum()


def _checks(x: np.ndarray, sigma: float) -> dict[str, bool]:
    """Mean, variance, tails and a chi-square goodness of fit against the exact pmf."""
    n = x.size
    support = np.arange(-math.ceil(12 * sigma), math.ceil(12 * sigma) + 1)
    pmf = _pmf(sigma, support)
    var = float(np.sum(pmf * np.square(support)))  # below sigma^2 for small sigma
    tail = float(pmf[np.abs(support) > 2 * sigma].sum())
    # bins with at least 50 expected draws, the rest pooled into the two tails
    expected = pmf * n
    inner = support[expected >= 50]
    lo, hi = int(inner.min()), int(inner.max())
    mid = (x >= lo) & (x <= hi)
    observed = np.array(
        [np.sum(x < lo), *np.bincount(x[mid] - lo, minlength=hi - lo + 1), np.sum(x > hi)], float
    )
    inside = (support >= lo) & (support <= hi)
    want = np.array([expected[support < lo].sum(), *expected[inside], expected[support > hi].sum()])
    keep = want > 0
    p = stats.chisquare(observed[keep], want[keep] * observed[keep].sum() / want[keep].sum()).pvalue
    return {
        "mean": abs(x.mean()) < 5 * math.sqrt(var / n),
        "variance": abs(x.var() / var - 1) < 0.01,
        "tails": abs(np.mean(np.abs(x) > 2 * sigma) / tail - 1) < 0.05,
        "chi-square": p > 1e-4,
    }


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_a_million_draws_follow_the_discrete_gaussian(sigma: float) -> None:
    """Fixed seed: a sampler off by a few percent anywhere fails."""
    checks = _checks(discrete_gaussian(sigma, 10**6, np.random.default_rng(1)), sigma)
    assert all(checks.values()), checks


def test_a_slightly_wrong_sampler_fails_the_same_checks() -> None:
    """The checks have teeth: rounded continuous Gaussian draws 2% too wide fail them."""
    x = np.rint(np.random.default_rng(1).normal(0, 3.0 * 1.02, 10**6)).astype(np.int64)
    checks = _checks(x, 3.0)
    assert not checks["variance"] and not checks["chi-square"], checks


def test_conditional_rounding_keeps_the_norm_bound_and_is_unbiased() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 4000)
    x *= 50 / np.linalg.norm(x)
    bound = rounded_bound(50, x.size)
    assert 50 < bound <= 50 + math.sqrt(x.size)
    draws = np.stack([conditional_round(x, bound, rng) for _ in range(400)])
    assert np.all(np.linalg.norm(draws, axis=1) <= bound)
    assert np.abs(draws.mean(axis=0) - x).max() < 0.2  # stochastic rounding's mean, per coordinate
    with pytest.raises(ValueError, match="no rounding within"):
        conditional_round(x, 49.0, rng, tries=5)


def test_tau_is_kls21_theorem_1() -> None:
    sigma, n = 1.0, 4
    want = 10 * sum(math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in (1, 2, 3))
    assert tau(sigma, n) == pytest.approx(want) and tau(sigma, 1) == 0.0
    assert tau(1000.0, 10_000) == 0.0  # fedpeft's noise shares: the correction vanishes
