"""The SecAgg+ bounds a configuration must meet (fedpeft.config.validate) and a device enforces
(fedpeft.secagg.protocol): the graph's degree, the fewest neighbours, the smallest threshold. Plain
arithmetic, here so that the config tree reads them without importing the protocol's cryptography."""

from __future__ import annotations

# A device's default: masked with at least two other clients, and safe against the server with one
# colluding client (c = MIN_NEIGHBOURS - 1; see fedpeft.secagg.protocol's docstring).
MIN_NEIGHBOURS = 2


def degree(k: int, n: int) -> int:
    """The number of neighbours `fedpeft.secagg.graph.neighbours(clients, k, seed)` gives each of n clients."""
    return n - 1 if k >= n - 1 else min(2 * ((k + 1) // 2), n - 1)


def min_threshold(holders: int, min_neighbours: int = MIN_NEIGHBOURS) -> int:
    """The smallest t with 2t > holders + c, c = min_neighbours - 1 colluding holders (a strict majority of
    the holders, a client and its neighbours, when c = 0): no two groups of holders that share only
    colluders both reach t, so asking different holders cannot yield both secrets of one client. And t > m,
    so t signers among a client and its partners include m partners (fedpeft.secagg.protocol's docstring)."""
    m = max(min_neighbours, 1)
    return max((holders + m - 1) // 2 + 1, m + 1)
