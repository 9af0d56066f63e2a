"""The SecAgg+ communication graph: each client masks and shares secrets with its k neighbours only.

Bell et al. (CCS 2020) show that a random graph of degree k = O(log n) keeps the protocol secure and
dropout-robust with high probability, cutting the cost from O(n) to O(log n) per client. We use a
Harary graph (each client joined to the k/2 nearest on each side of a ring) over a permutation of
the clients drawn from a public seed: every client has exactly k neighbours. k >= n - 1 is the
complete graph of the original protocol (Bonawitz et al., CCS 2017). Each client's degree is
fedpeft.config.secagg_bounds.degree (the configuration checks it without numpy).
"""

from __future__ import annotations

import numpy as np


def neighbours(clients: list[int], k: int, seed: int) -> dict[int, list[int]]:
    """{client: sorted neighbours}; symmetric, no self-loops, degree min(k, n - 1) (k rounded up to even)."""
    n = len(clients)
    if n < 2:
        raise ValueError("secure aggregation needs at least 2 clients")
    if k >= n - 1:
        return {c: sorted(d for d in clients if d != c) for c in clients}
    half = (k + 1) // 2
    ring = [clients[i] for i in np.random.default_rng([seed, 99]).permutation(n)]
    graph: dict[int, set[int]] = {c: set() for c in clients}
    for i, c in enumerate(ring):
        for step in range(1, half + 1):
            d = ring[(i + step) % n]
            graph[c].add(d)
            graph[d].add(c)
    return {c: sorted(v) for c, v in graph.items()}
