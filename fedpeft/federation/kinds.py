"""What each kind of device got from a federation: held-out ppl pooled over the clients of each LoRA rank
(fedpeft.federation.ranks) or each quantization of the base (fedpeft.model.fingerprint)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)


def by_kind(history: Sequence[Any], kinds: Mapping[str, K]) -> dict[K, dict[str, float]]:
    """{kind: {clients, ppl_start, ppl}}: the held-out ppl of the first and the last round pooled (token-weighted
    loss) over the clients of each kind (`kinds`: user -> kind)."""
    if not kinds or not history:
        return {}
    first, last = history[0], history[-1]
    out: dict[K, dict[str, float]] = {}
    for kind in sorted(set(kinds.values())):  # type: ignore[type-var]
        users = [u for u, k in kinds.items() if k == kind]
        start, end = _pooled(first, users), _pooled(last, users)
        if end is not None:
            out[kind] = {"clients": float(len(users)), "ppl_start": start or float("nan"), "ppl": end}
    return out


def by_quant(history: Sequence[Any]) -> dict[str, dict[str, float]]:
    """Per quantization of the base, where the devices ran several (round 0's `quants`); else {}."""
    return by_kind(history, (getattr(history[0], "quants", None) or {}) if history else {})


def _pooled(m: Any, users: Sequence[str]) -> float | None:
    clients = getattr(m, "clients", None) or {}
    rows = [clients[u] for u in users if u in clients and clients[u].loss is not None]
    tokens = sum(float(c.tokens or 0) for c in rows)
    if not tokens:
        return None
    return float(np.exp(sum(c.loss * float(c.tokens or 0) for c in rows) / tokens))
