"""Registration without Flower: who is in the federation, under which client index, on which base.

fedpeft.federation.loop asks every node to describe itself and hands the answers here as `Registration`s. Simulated
clients report their partition index and keep it; real devices report a name and are indexed in name
order (node id breaks ties), so a deployment of the same users as a simulation gets the same indices,
hence the same seeds. The federation's base is the one most clients hold (ties go to the lowest client
index) unless a base is pinned (a resumed run's checkpoint, --base-fingerprint).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedpeft.config.tree import FederationConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.state import sample_clients
from fedpeft.model.adapter_files import names_base
from fedpeft.privacy.central import poisson_sample

log = logging.getLogger("fedpeft")


# what a node may report of its compute precision (fedpeft.model.precision.Precision.metrics)
COMPUTE_KEYS = ("dtype", "why", "capability", "fp32_gflops", "bf16_gflops")


@dataclass(frozen=True)
class Registration:
    """One node's answer to the registration query."""

    node: int  # Flower node id
    name: str  # the user's name
    fingerprint: str  # of the base the node holds
    examples: float  # training tokens: the FedAvg weight
    client: int | None = None  # partition index (simulation); None for a device, indexed here
    # what the node computes in and why (fedpeft.model.precision.Precision.metrics): each device decides for itself
    compute: Mapping[str, Any] = field(default_factory=dict)
    rank: int = 0  # the LoRA rank it trains, where less than the federation's (fedpeft.federation.ranks)
    source: str = ""  # of the weights its base was quantized from (fedpeft.model.fingerprint)
    quant: str = ""  # how it quantized them: none, bf16, int8, nf4

    @classmethod
    def from_info(cls, node: int, info: Mapping[str, Any]) -> Registration:
        """From the "info" record of a reply (fedpeft.device.tasks `info`)."""
        compute = {  # reported by the node: only the known keys, as short scalars
            k: v if not isinstance(v, str) else v[:200]
            for k in COMPUTE_KEYS
            if isinstance(v := info.get(f"compute-{k}"), (str, int, float)) and not isinstance(v, bool)
        }
        return cls(
            node,
            str(info["name"]),
            str(info["fingerprint"]),
            float(info["num-examples"]),
            int(info["client"]) if "client" in info else None,
            compute,
            _rank(info.get("rank", 0)),
            str(info.get("source", ""))[:128],
            str(info.get("quant", ""))[:16],
        )


def _rank(value: Any) -> int:
    """A reported rank, or 0 (the federation's) for anything but a small positive whole number."""
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and value == value
        and 0 < value < 2**16
    )
    return int(value) if ok and float(value).is_integer() else 0


@dataclass
class Roster:
    """What registration learned of each client (by client index)."""

    node_of: dict[int, int] = field(default_factory=dict)  # Flower node id
    names: dict[int, str] = field(default_factory=dict)
    fingerprints: dict[int, str] = field(default_factory=dict)
    examples: dict[int, float] = field(default_factory=dict)  # training tokens: the FedAvg weight
    samples: dict[int, list[int]] = field(default_factory=dict)  # each DP round's Poisson sample, drawn once
    compute: dict[int, dict[str, Any]] = field(default_factory=dict)  # each client's compute dtype and why
    ranks: dict[int, int] = field(default_factory=dict)  # LoRA ranks below the federation's, as registered
    sources: dict[int, str] = field(default_factory=dict)  # of the weights each base was quantized from
    quants: dict[int, str] = field(default_factory=dict)  # each client's quantization of them
    fingerprint: str = ""  # the federation's base: source weights, or one exact quantized base when pinned

    def sample(self, f: FederationConfig, rnd: int, poisson: bool = False) -> list[int]:
        """This round's clients; indices into the registered clients (some devices may have failed). With
        `poisson` (DP runs) each joins with probability --fraction from secret randomness, drawn once a
        round (the next round's sample is drawn early when its secure-aggregation keys travel ahead)."""
        ids = sorted(self.node_of)
        if not poisson:
            return [ids[i] for i in sample_clients(len(ids), f.fraction, f.min_clients, f.seed, rnd)]
        if rnd not in self.samples:
            self.samples[rnd] = poisson_sample(ids, f.fraction)
        return self.samples[rnd]

    def holds(self, client: int) -> bool:
        return names_base(self.fingerprint, self.fingerprints[client], self.sources.get(client, ""))

    def on_base(self) -> list[int]:
        """Clients whose base is the federation's (the others are refused, and refuse, every round)."""
        return [c for c in sorted(self.node_of) if self.holds(c)]

    def off_base(self) -> list[int]:
        return [c for c in sorted(self.node_of) if not self.holds(c)]

    def mixed_quants(self) -> dict[int, str]:
        """Each client's quantization where the clients on the federation's base run more than one, else {}."""
        on = {c: self.quants.get(c, "") for c in self.on_base()}
        return on if len(set(on.values())) > 1 else {}

    def task(self, client: int, **task: Any) -> dict[str, Any]:
        """Every task after registration names its client index and the federation's base fingerprint: a
        device learns its index from it and refuses to train on another base."""
        return {**task, "client": client, "fingerprint": self.fingerprint}


def order(replies: Sequence[Registration]) -> list[Registration]:
    """Simulated clients by partition index, devices by name, then node id."""
    return sorted(replies, key=lambda r: (-1 if r.client is None else r.client, r.name, r.node))


def vote(fingerprints: Mapping[int, str], pinned: str = "") -> str:
    """The pinned base, or the one most clients hold; a tie goes to the base of the lowest client index."""
    if pinned:
        return pinned
    counts: dict[str, int] = {}
    for c in sorted(fingerprints):  # dicts keep insertion order and max keeps the first maximum
        counts[fingerprints[c]] = counts.get(fingerprints[c], 0) + 1
    return max(counts, key=lambda fp: counts[fp])


def make_roster(
    replies: Sequence[Registration],
    failures: Sequence[str],
    want: int,
    min_clients: int,
    pinned: str = "",
) -> Roster:
    """The federation from the nodes' answers (`failures`: the one-line errors of the nodes that could not
    start). Keeps the first `want` clients in `order`; raises FedpeftError when a simulated client failed
    (they share one data set: a failure there is the run's, not one device's), when fewer than
    `min_clients` started, or when no client holds the federation's base."""
    if failures:
        for reason in failures:
            log.warning("a client failed to start and is left out: %s", reason)
        if all(r.client is not None for r in replies):
            raise FedpeftError(f"a client failed to start: {failures[0]}")
    if len(replies) < min_clients:
        raise FedpeftError(f"only {len(replies)} clients started; --min-clients is {min_clients}")
    good = order(replies)
    if len(good) > want:
        log.warning("%d clients connected; the federation takes the first %d by name", len(good), want)
        good = good[:want]
    roster = Roster()
    for index, r in enumerate(good):
        client = index if r.client is None else r.client
        roster.node_of[client], roster.names[client] = r.node, r.name
        roster.fingerprints[client], roster.examples[client] = r.fingerprint, r.examples
        roster.sources[client], roster.quants[client] = r.source or r.fingerprint, r.quant
        if r.compute:
            roster.compute[client] = dict(r.compute)
        if r.rank:
            roster.ranks[client] = r.rank
    if len(set(roster.names.values())) < len(roster.names):
        log.warning("two clients report the same name; they are told apart by node id")
    roster.fingerprint = vote(roster.sources, pinned)
    odd = roster.off_base()
    if odd:
        log.warning(
            "clients on another base than the federation's (%s...); they are refused every round: %s",
            roster.fingerprint[:16],
            ", ".join(roster.names[c] for c in odd),
        )
    if not roster.on_base():
        raise FedpeftError(f"no client holds the federation's base {roster.fingerprint[:16]}...")
    if mixed := roster.mixed_quants():
        counts = {q: list(mixed.values()).count(q) for q in sorted(set(mixed.values()))}
        log.info(
            "clients run the federation's base in %s; held-out quality is reported per quantization",
            ", ".join(f"{q or 'unknown'} ({n})" for q, n in counts.items()),
        )
    return roster
