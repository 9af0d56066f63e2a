"""fedpeft/privacy/central.py: clipping, the server's noise (distribution, no bias) and Poisson sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedpeft.privacy.central import clip, l2_norm, noised_mean, poisson_sample


def test_clip_scales_the_whole_delta_to_the_bound_and_keeps_its_direction() -> None:
    delta = {"a": np.full((3, 4), 2.0, np.float32), "b": np.array([1.0, -3.0], np.float32)}
    clipped, was = clip(delta, 0.5)
    assert was and l2_norm(clipped) == pytest.approx(0.5, rel=1e-6)
    ratio = clipped["a"][0, 0] / delta["a"][0, 0]
    assert clipped["b"] == pytest.approx(delta["b"] * ratio) and clipped["a"].dtype == np.float32
    small, was = clip(delta, 100.0)
    assert not was and small is delta


def test_noise_has_the_stated_distribution_and_no_bias() -> None:
    """A million coordinates: the noised mean of a known sum is unbiased, its spread std / expected, and
    it is Gaussian (Kolmogorov-Smirnov at 1e-6; the noise is secret randomness, so no fixed seed)."""
    n, std, expected = 1_000_000, 0.3, 4.0
    total = {"x": np.full(n, 2.0)}
    out = noised_mean(total, expected, std)["x"]
    noise = out * expected - 2.0
    assert abs(noise.mean()) < 6 * std / math.sqrt(n)
    assert noise.std() == pytest.approx(std, rel=5e-3)
    assert stats.kstest(noise / std, "norm").pvalue > 1e-6  # unseeded: a false alarm once in a million runs
    assert out.mean() == pytest.approx(0.5, abs=6 * std / expected / math.sqrt(n))
    # tails: about 0.27% beyond 3 sigma
    assert np.mean(np.abs(noise) > 3 * std) == pytest.approx(2 * stats.norm.sf(3), rel=0.1)


def test_the_noise_is_not_a_function_of_a_seed() -> None:
    total = {"x": np.zeros(1000)}
    assert not np.array_equal(noised_mean(total, 1.0, 1.0)["x"], noised_mean(total, 1.0, 1.0)["x"])


def test_poisson_sampling_includes_each_client_with_probability_q() -> None:
    clients, q, draws = list(range(50)), 0.2, 2000
    counts = np.zeros(len(clients))
    sizes = []
    for _ in range(draws):
        s = poisson_sample(clients, q)
        sizes.append(len(s))
        counts[s] += 1
    assert counts.sum() / (draws * len(clients)) == pytest.approx(q, rel=0.03)
    assert np.var(sizes) == pytest.approx(len(clients) * q * (1 - q), rel=0.15)  # binomial, not fixed-size
