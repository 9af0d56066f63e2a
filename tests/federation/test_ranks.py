"""Devices of different LoRA ranks (fedpeft.federation.ranks, fedpeft.device.rank_slice): padding and truncation
on crafted tensors, per-slice means, the effective rank, and a mixed-rank federation, plain and secure."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config.tree import RunConfig
from fedpeft.config.validate import validate
from fedpeft.errors import FedpeftError
from fedpeft.federation.aggregate import weighted_sum
from fedpeft.federation.metrics import as_metrics
from fedpeft.federation.ranks import (
    by_rank,
    coverage,
    divide_by_slice,
    effective_rank,
    round_cap,
    thin_slice,
    travel_rank,
    truncate,
)
from fedpeft.federation.state import checkpoint_path, load_checkpoint
from tests.federation.test_loop import _cfg, _run, users  # noqa: F401  (users: the module's fixture)

A, B = "m.lora_A.weight", "m.lora_B.weight"


def test_truncation_zeroes_a_rows_and_b_columns_from_the_rank_on() -> None:
    arrays = {A: np.arange(12.0).reshape(4, 3), B: np.arange(8.0).reshape(2, 4), "m.ia3_l": np.ones(3)}
    out = truncate(arrays, 2)
    np.testing.assert_array_equal(out[A][:2], arrays[A][:2])
    np.testing.assert_array_equal(out[B][:, :2], arrays[B][:, :2])
    assert not out[A][2:].any() and not out[B][:, 2:].any()
    assert out["m.ia3_l"] is arrays["m.ia3_l"] and arrays[A][3, 0] == 9  # the input is left as it was
    assert truncate(arrays, 4)[A] is arrays[A]
    schema = [(A, (4, 3), "float32"), (B, (2, 4), "float32"), ("m.lora_R.weight", (4, 4), "float32")]
    assert travel_rank(schema, [A, B]) == 4 and travel_rank(schema, [B]) == 4
    assert travel_rank(schema, ["m.lora_R.weight"]) == 0  # Fed-SB: no LoRA matrix travels


def test_each_rank_slice_is_averaged_over_the_clients_that_train_it() -> None:
    rng = np.random.default_rng(0)
    ranks, weights = [1, 2, 4], [3.0, 1.0, 2.0]
    deltas = [truncate({A: rng.normal(size=(4, 3)), B: rng.normal(size=(2, 4))}, r) for r in ranks]
    cover = coverage(ranks, weights, 4)
    np.testing.assert_array_equal(cover, [6.0, 3.0, 2.0, 2.0])
    mean = divide_by_slice(weighted_sum(deltas, weights), cover, sum(weights))
    for j in range(4):
        who = [i for i, r in enumerate(ranks) if j < r]
        w = np.array([weights[i] for i in who])
        expect_a = sum(weights[i] * deltas[i][A][j] for i in who) / w.sum()
        expect_b = sum(weights[i] * deltas[i][B][:, j] for i in who) / w.sum()
        np.testing.assert_allclose(mean[A][j], expect_a, rtol=1e-6)
        np.testing.assert_allclose(mean[B][:, j], expect_b, rtol=1e-6)
    # a slice nobody trained stays zero
    lone = divide_by_slice(weighted_sum(deltas[:1], [1.0]), coverage([1], [1.0], 4), 1.0)
    assert not lone[A][1:].any() and lone[A][0].any()


def test_effective_rank_counts_equal_directions() -> None:
    b = np.zeros((6, 4))
    a = np.zeros((4, 5))
    assert effective_rank({B: b, A: a}) is None  # nothing moved yet
    b[0, 0] = b[1, 1] = 1.0
    a[0, 0] = a[1, 1] = 3.0
    assert effective_rank({B: b, A: a}) == pytest.approx(2.0)
    a[1, 1] = 0.0  # one direction left
    assert effective_rank({B: b, A: a}) == pytest.approx(1.0)


def test_mixed_ranks_are_refused_where_they_are_not_built(users: Path, cache_dir: str) -> None:  # noqa: F811
    cfg = _cfg(users, cache_dir, client_ranks=(2, 4))
    assert validate(cfg) is cfg
    for bad, message in (
        (replace(cfg, federation=replace(cfg.federation, client_ranks=(2, 8))), "1 to the federation's"),
        (replace(cfg, federation=replace(cfg.federation, lora_mode="sb")), "mixed ranks need"),
    ):
        with pytest.raises(FedpeftError, match=message):
            validate(bad)


def test_a_secure_round_caps_the_rank_so_that_no_slice_is_one_clients() -> None:
    assert round_cap([1, 2, 4], 4, 2) == 2  # slices 3 and 4 would be the rank-4 client's alone
    assert round_cap([0, 0, 2], 4, 2) == 4  # 0: the federation's rank
    assert round_cap([2, 2, 4, 4], 4, 2) == 4 and round_cap([4], 4, 2) == 4  # one client: the round aborts
    assert thin_slice([2, 4], 4, 2) == 2 and thin_slice([2, 2, 4, 4], 4, 2) is None
    assert thin_slice([1, 2, 4], 2, 2) is None  # capped at 2: two train the second slice
    assert thin_slice([1, 2], 2, 2) == 1  # the rank-4 client dropped: the rank-2 one alone in the second
    assert thin_slice([2, 2], 4, 3) == 0


def _mixed(users: Path, cache_dir: str, ranks: tuple[int, ...], **fed) -> RunConfig:  # noqa: F811
    return _cfg(users, cache_dir, clients=len(ranks), fraction=1.0, rounds=2, client_ranks=ranks, **fed)


def _secure(cfg: RunConfig) -> RunConfig:
    return replace(cfg, federation=replace(cfg.federation, secagg=True, secagg_k=2))


def test_a_mixed_rank_federation_trains_slices_and_a_secure_one_equals_the_plain_one(
    tmp_path: Path,
    users: Path,  # noqa: F811
    cache_dir: str,
    tiny_path: Path,
) -> None:
    cfg = _mixed(users, cache_dir, (2, 4, 2, 4))
    _run(cfg, tmp_path / "plain")
    _run(_secure(cfg), tmp_path / "secure")
    plain, secure = (load_checkpoint(checkpoint_path(tmp_path / r, 2)) for r in ("plain", "secure"))
    for h in (plain.history[1], secure.history[1]):
        assert sorted(h["ranks"].values()) == [2, 2, 4, 4] and h["ranks"] == plain.history[1]["ranks"]
        assert 1.0 <= h["effective_rank"] <= 4.0
    b = [v for k, v in plain.arrays.items() if ".lora_B." in k]
    assert all(max(np.abs(v[:, j]).max() for v in b) > 0 for j in range(4))  # every slice moved
    for k, v in plain.arrays.items():  # the per-slice weights summed masked, too
        np.testing.assert_allclose(secure.arrays[k], v, atol=1e-6)
    assert not all(np.array_equal(secure.arrays[k], v) for k, v in plain.arrays.items())
    groups = by_rank([as_metrics(h) for h in plain.history])
    assert sorted(groups) == [2, 4] and all(g["clients"] == 2 for g in groups.values())


def test_a_secure_round_trains_no_slice_that_one_client_alone_would_fill(
    tmp_path: Path,
    users: Path,  # noqa: F811
    cache_dir: str,
    tiny_path: Path,
) -> None:
    _run(_secure(_mixed(users, cache_dir, (1, 2, 4))), tmp_path / "secure")
    state = load_checkpoint(checkpoint_path(tmp_path / "secure", 2))
    assert sorted(state.history[1]["ranks"].values()) == [1, 2, 2]  # the rank-4 client trained 2 this round
    b = [v for k, v in state.arrays.items() if ".lora_B." in k]
    assert all(max(np.abs(v[:, j]).max() for v in b) > 0 for j in range(2))
    assert all(not v[:, 2:].any() for v in b)
