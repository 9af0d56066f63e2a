"""Devices of different LoRA ranks in one federation (HetLoRA, Cho et al., EMNLP 2024), on named numpy arrays.

The federation's adapter has the largest rank R. A device of rank r < R trains the leading r rows of every A
(r x in) and the leading r columns of every B (out x r), the rest held at zero: its model is the global adapter
truncated to rank r, and its delta is zero outside its slice. Every delta keeps the full shape, so SecAgg+
sums them unchanged. Averaging slice j over all devices would shrink it by the share of devices that train
it; instead slice j is divided by its coverage, the total weight of the devices of rank > j. The coverage is a
sum too: a device adds w·[j < r] for j < R beside its delta, inside the secure sum (fedpeft.secagg.quantize
encodes it like any entry), so the server learns per-rank totals only.

HetLoRA's rank self-pruning and FlexLoRA's SVD redistribution need one client's full update or the server's
product matrices per client, which a sum-only server does not have; raFLoRA (2026) shows that truncation-based
schemes can collapse into the smallest shared rank, which `effective_rank` reports each round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedpeft.federation.kinds import by_kind

Arrays = dict[str, np.ndarray]
A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def rank_axis(key: str) -> int | None:
    """The axis of a LoRA tensor that runs over the rank: A's rows, B's columns; None for others."""
    if key.endswith(A_KEY):
        return 0
    if key.endswith(B_KEY):
        return 1
    return None


def full_rank(schema: Iterable[Sequence]) -> int:
    """R: the rank of the federation's LoRA tensors in `schema` ((name, shape, dtype) rows), 0 if none."""
    for name, shape, *_ in schema:
        axis = rank_axis(name)
        if axis is not None:
            return int(shape[axis])
    return 0


def travel_rank(schema: Iterable[Sequence], travel_keys: Iterable[str]) -> int:
    """R over the tensors that travel (0 under Fed-SB, whose A and B never do): client and server both
    derive it, and with it the coverage entries a secure sum carries."""
    keys = set(travel_keys)
    return full_rank([row for row in schema if row[0] in keys])


def truncate(arrays: Mapping[str, np.ndarray], r: int) -> Arrays:
    """The arrays with every rank slice from r on set to zero (copies where they change)."""
    out = dict(arrays)
    for k, v in arrays.items():
        axis = rank_axis(k)
        if axis is not None and v.shape[axis] > r:
            v = v.copy()
            v[(slice(None),) * axis + (slice(r, None),)] = 0
            out[k] = v
    return out


def indicator(r: int, full: int) -> np.ndarray:
    """[j < r] for j < full: the slices a device of rank r trains."""
    return (np.arange(full) < r).astype(np.float64)


def coverage(ranks: Sequence[int], weights: Sequence[float], full: int) -> np.ndarray:
    """Per rank slice, the total weight of the devices that train it."""
    return sum((w * indicator(r, full) for r, w in zip(ranks, weights, strict=True)), np.zeros(full))


def divide_by_slice(total: Mapping[str, np.ndarray], cover: np.ndarray, weight: float) -> Arrays:
    """The per-slice mean from a weighted sum: rank slice j over cover[j], other tensors over `weight`;
    a slice no device trained stays zero."""
    out: Arrays = {}
    safe = np.where(cover > 0, cover, 1.0)
    for k, v in total.items():
        axis = rank_axis(k)
        if axis is None:
            out[k] = (v / weight).astype(np.float32)
            continue
        shape = [1] * v.ndim
        shape[axis] = -1
        mean = v / safe.reshape(shape) * (cover > 0).reshape(shape)
        out[k] = mean.astype(np.float32)
    return out


def effective_rank(arrays: Mapping[str, np.ndarray]) -> float | None:
    """The mean over layers of the effective rank of each update B·A (Roy and Vetterli, 2007: exp of the
    entropy of the normalized singular values; r for r equal directions, 1 for one): a federation whose
    adapter collapses into a smaller rank shows it here. None when no layer has moved."""
    found = []
    for key, b in arrays.items():
        if not key.endswith(B_KEY):
            continue
        a = arrays.get(key[: -len(B_KEY)] + A_KEY)
        if a is None:
            continue
        # the singular values of B·A are those of R_B·R_Aᵀ (B = Q_B R_B, Aᵀ = Q_A R_A): r x r, not out x in
        rb = np.linalg.qr(b.astype(np.float64), mode="r")
        ra = np.linalg.qr(a.T.astype(np.float64), mode="r")
        s = np.linalg.svd(rb @ ra.T, compute_uv=False)
        if s.sum() <= 1e-12:
            continue
        p = s / s.sum()
        p = p[p > 0]
        found.append(float(np.exp(-(p * np.log(p)).sum())))
    return float(np.mean(found)) if found else None


def by_rank(history: Sequence[Any]) -> dict[int, dict[str, float]]:
    """The held-out ppl of the first and the last round pooled over the clients of each rank ({rank: {clients,
    ppl_start, ppl}}), each client's rank as it last trained; {} when every client trained the federation's.
    What a device of each kind got from the federation."""
    ranks: dict[str, int] = {}
    for m in history:
        ranks.update(getattr(m, "ranks", None) or {})
    return by_kind(history, ranks)


def round_cap(ranks: Sequence[int], full: int, least: int) -> int:
    """The highest rank a secure round lets its clients train: every slice below it has at least `least` of
    them (`ranks`: theirs as they registered, 0 for the federation's). A slice trained by one client alone
    would come out of the sum as that client's own update, and the server knows from the clear ranks whose."""
    have = [r if 0 < r <= full else full for r in ranks]
    fits = [r for r in range(1, full + 1) if sum(h >= r for h in have) >= least]
    return max(fits, default=full)


def thin_slice(ranks: Sequence[int], cap: int, least: int) -> int | None:
    """The first rank slice that fewer than `least` (but some) of these clients trained, capped at `cap`:
    the survivors of a secure round must not leave one."""
    have = [min(r, cap) for r in ranks]
    for j in range(cap):
        n = sum(h > j for h in have)
        if 0 < n < least:
            return j
    return None
