"""Aggregation against straightforward numpy references, including the exactness claims of each mode."""

import numpy as np
import pytest

from fedpeft.config.tree import ServerOptConfig
from fedpeft.federation.aggregate import divide, server_update, weighted_mean, weighted_sum

RNG = np.random.default_rng(0)


def _updates(n: int) -> list[dict[str, np.ndarray]]:
    return [
        {"a": RNG.normal(size=(3, 4)).astype(np.float32), "b": RNG.normal(size=(5,)).astype(np.float32)}
        for _ in range(n)
    ]


def test_weighted_mean_matches_numpy() -> None:
    ups, w = _updates(5), [3.0, 1.0, 7.0, 2.0, 5.0]
    got = weighted_mean(ups, w)
    for k in ("a", "b"):
        ref = np.average(np.stack([u[k] for u in ups]), axis=0, weights=w)
        np.testing.assert_allclose(got[k], ref, rtol=1e-6)
        assert got[k].dtype == np.float32


def test_sum_then_divide_equals_mean() -> None:
    ups, w = _updates(4), [1.0, 2.0, 3.0, 4.0]
    total = weighted_sum(ups, w)
    for k, v in divide(total, 10.0).items():
        np.testing.assert_allclose(v, weighted_mean(ups, w)[k], rtol=1e-7)


def test_mismatched_keys_or_weights_raise() -> None:
    ups = _updates(2)
    with pytest.raises(ValueError):
        weighted_sum([ups[0], {"a": ups[1]["a"]}], [1, 1])
    with pytest.raises(ValueError):
        weighted_sum(ups, [1])
    with pytest.raises(ValueError):
        divide(weighted_sum(ups, [1, 1]), 0.0)


def test_ffa_mean_of_b_is_exact_mean_of_products() -> None:
    """With A shared and frozen, averaging B gives exactly the average of the LoRA products B_i A."""
    a = RNG.normal(size=(4, 16))
    bs = [RNG.normal(size=(16, 4)) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    mean_b = weighted_mean([{"b": b} for b in bs], w)["b"].astype(np.float64)
    ref = np.average(np.stack([b @ a for b in bs]), axis=0, weights=w)
    np.testing.assert_allclose(
        mean_b @ a, ref, rtol=0, atol=1e-6 * np.abs(ref).max()
    )  # float32 rounding only


def test_fedavg_on_a_and_b_is_not_the_mean_of_products() -> None:
    """What the docs warn about: averaging A and B separately differs from averaging B·A."""
    pairs = [(RNG.normal(size=(16, 4)), RNG.normal(size=(4, 16))) for _ in range(3)]
    mean = weighted_mean([{"lora_B": b, "lora_A": a} for b, a in pairs], [1.0, 2.0, 3.0])
    product_mean = sum(w * (b @ a) for w, (b, a) in zip([1.0, 2.0, 3.0], pairs, strict=True)) / 6.0
    np.testing.assert_allclose(
        mean["lora_B"], sum(w * b for w, (b, _) in zip([1, 2, 3], pairs, strict=True)) / 6
    )
    assert not np.allclose(mean["lora_B"] @ mean["lora_A"], product_mean, atol=1e-3)


def test_fedavg_server_step_adds_the_mean_delta() -> None:
    g = {"a": np.ones((2, 2), np.float32)}
    d = {"a": np.full((2, 2), 0.5, np.float32)}
    new, state = server_update(g, d, ServerOptConfig("fedavg"), {})
    np.testing.assert_allclose(new["a"], 1.5)
    assert state == {}
    assert g["a"][0, 0] == 1.0  # pure: inputs untouched


def _reference_adaptive(
    name: str, deltas: list[np.ndarray], lr: float, b1: float, b2: float, tau: float
) -> np.ndarray:
    x, m, v = np.zeros_like(deltas[0]), np.zeros_like(deltas[0]), np.full_like(deltas[0], tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if name == "fedadam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_adaptive_optimizers_match_reddi_et_al(name: str) -> None:
    deltas = [RNG.normal(size=(6,)) * 1e-2 for _ in range(4)]
    cfg = ServerOptConfig(name, lr=0.01)
    g, state = {"w": np.zeros(6, np.float64)}, {}
    for d in deltas:
        g, state = server_update(g, {"w": d}, cfg, state)
    np.testing.assert_allclose(g["w"], _reference_adaptive(name, deltas, 0.01, 0.9, 0.99, 1e-3), rtol=1e-10)
    assert set(state) == {"m/w", "v/w"}


def test_fedavgm_accumulates_momentum() -> None:
    cfg = ServerOptConfig("fedavgm", lr=1.0, momentum=0.5)
    g, state = {"w": np.zeros(1)}, {}
    for _ in range(3):
        g, state = server_update(g, {"w": np.ones(1)}, cfg, state)
    np.testing.assert_allclose(g["w"], [1 + 1.5 + 1.75])


def test_only_sent_names_move() -> None:
    g = {"A": np.ones(2, np.float32), "B": np.zeros(2, np.float32)}
    new, _ = server_update(g, {"B": np.ones(2, np.float32)}, ServerOptConfig("fedadam"), {})
    np.testing.assert_array_equal(new["A"], g["A"])
    assert not np.array_equal(new["B"], g["B"])
