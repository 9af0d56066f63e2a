"""The server's state machine of SecAgg+ (fedpeft.secagg.protocol has the stages and the client's): it
routes keys and ciphertexts, sums the masked inputs of the survivors, has them sign the survivor set, and
removes the masks with the shares they reveal. It learns the sum and nothing else."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedpeft.secagg import crypto, shamir
from fedpeft.secagg.graph import neighbours as make_graph
from fedpeft.secagg.protocol import LIMBS, Keys, SecAggAbort, commit, pair_mask, survivors_message


@dataclass
class SecAggServer:
    clients: list[int]
    k: int
    t: int
    tag: bytes
    dim: int  # length of every masked vector (entries, weight included)
    seed: int = 0
    graph: dict[int, list[int]] = field(init=False)
    keys: dict[int, Keys] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> ciphertext
    commitments: dict[int, bytes] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    masked_with: dict[int, set[int]] = field(default_factory=dict)  # client -> neighbours it masked with
    excluded: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph = make_graph(sorted(self.clients), self.k, self.seed)

    def receive_keys(self, keys: dict[int, Keys]) -> dict[int, dict[int, Keys]]:
        """Stage 1 -> 2: the keys each client gets (its neighbours' that advertised)."""
        self.keys = {
            c: v for c, v in keys.items() if c in self.graph and len(v) == 3 and all(len(x) == 32 for x in v)
        }
        if len(self.keys) < self.t:
            raise SecAggAbort(f"{len(self.keys)} clients advertised keys < threshold {self.t}")
        return {c: {j: self.keys[j] for j in self.graph[c] if j in self.keys} for c in self.keys}

    def receive_shares(
        self, shares: dict[int, tuple[dict[int, bytes], bytes]]
    ) -> dict[int, tuple[dict[int, bytes], list[int]]]:
        """Stage 2 -> 3: route ciphertexts to their receivers. Returns {client: (ciphertexts for it, alive)}."""
        self.u2 = sorted(
            c
            for c, (out, com) in shares.items()
            if c in self.keys and set(out) <= set(self.graph[c]) and len(com) == 32
        )
        self.commitments = {c: shares[c][1] for c in self.u2}
        if len(self.u2) < self.t:
            raise SecAggAbort(f"{len(self.u2)} clients shared keys < threshold {self.t}")
        self.routed = {c: {} for c in self.u2}
        for sender in self.u2:
            for receiver, ct in shares[sender][0].items():
                if receiver in self.routed:
                    self.routed[receiver][sender] = ct
        return {c: (self.routed[c], [j for j in self.graph[c] if j in self.u2]) for c in self.u2}

    def receive_inputs(self, inputs: dict[int, tuple[np.ndarray, list[int]]]) -> tuple[list[int], list[int]]:
        """Stage 3 -> 4: keep well-formed masked vectors; a wrong length, or shares another client could not
        decrypt, excludes that client (its masks are then removed like a dropout's). Returns (survivors, dropped)."""
        accused: set[int] = set()
        for c, (y, malformed) in inputs.items():
            if c not in self.u2:
                continue
            if y.shape != (self.dim,) or y.dtype != np.uint32:
                self.excluded[c] = (
                    f"masked vector of shape {y.shape} {y.dtype}, expected ({self.dim},) uint32"
                )
                continue
            self.inputs[c] = y
            self.masked_with[c] = {j for j in self.graph[c] if j in self.u2} - set(malformed)
            accused.update(j for j in malformed if j in self.u2)
        for j in accused:
            self.excluded[j] = "sent shares its neighbours could not decrypt"
            self.inputs.pop(j, None)
        survivors = sorted(self.inputs)
        if len(survivors) < self.t:
            raise SecAggAbort(f"{len(survivors)} valid masked inputs < threshold {self.t}")
        return survivors, sorted(set(self.u2) - set(survivors))

    def receive_signatures(self, survivors: list[int], signatures: dict[int, bytes]) -> dict[int, bytes]:
        """Stage 4 -> 5: the survivors' valid signatures on the survivor set, relayed to every survivor (each
        checks those of its own share holders itself)."""
        message = survivors_message(self.tag, survivors)
        valid = {
            c: sig
            for c, sig in sorted(signatures.items())
            if c in survivors and crypto.verify(self.keys[c][2], sig, message)
        }
        if len(valid) < self.t:
            raise SecAggAbort(f"{len(valid)} clients confirmed the survivor set < threshold {self.t}")
        return valid

    def unmask(
        self,
        survivors: list[int],
        dropped: list[int],
        replies: dict[int, tuple[dict[int, bytes], dict[int, bytes]]],
    ) -> np.ndarray:
        """Stage 5: reconstruct and remove every mask; returns the sum of the survivors' inputs mod 2^32."""
        if len([c for c in replies if c in survivors]) < self.t:
            raise SecAggAbort(f"{len(replies)} clients answered the unmask request < threshold {self.t}")
        total = np.zeros(self.dim, dtype=np.uint32)
        for c in survivors:
            total = total + self.inputs[c]
        for owner in survivors:
            b = self._reconstruct(
                owner,
                {h: r[0][owner] for h, r in replies.items() if owner in r[0]},
                lambda seed, o=owner: commit(self.tag, seed) == self.commitments[o],
            )
            total = total - crypto.mask(b, self.dim)
        for owner in dropped:
            peers = [p for p in self.graph[owner] if p in survivors and owner in self.masked_with[p]]
            if not peers:
                continue
            raw = self._reconstruct(
                owner,
                {h: r[1][owner] for h, r in replies.items() if owner in r[1]},
                lambda key, o=owner: crypto.public_bytes(crypto.private_from_bytes(key)) == self.keys[o][1],
            )
            s_sk = crypto.private_from_bytes(raw)
            for peer in peers:  # the survivor added +m if owner > peer else -m; take it back out
                m = pair_mask(s_sk, self.keys[peer][1], self.tag, owner, peer, self.dim)
                total = total - m if owner > peer else total + m
        return total

    def _reconstruct(self, owner: int, shares: dict[int, bytes], valid: Callable[[bytes], bool]) -> bytes:
        """Combine t of the holders' shares; if a holder sent a bad share, try other subsets of t until the
        result matches the owner's commitment (b) or public key (s_sk). Bounded: at most 256 subsets."""
        points = {}
        for holder, data in shares.items():
            if holder == owner or holder in self.graph[owner]:
                try:
                    points[holder + 1] = shamir.decode_share(data, LIMBS)
                except ValueError:
                    continue
        if len(points) < self.t:
            raise SecAggAbort(f"{len(points)} shares of client {owner}'s secret < threshold {self.t}")
        for subset in itertools.islice(itertools.combinations(sorted(points), self.t), 256):
            try:
                secret = shamir.combine({x: points[x] for x in subset}, self.t)
            except ValueError:
                continue
            if valid(secret):
                return secret
        raise SecAggAbort(f"no {self.t} consistent shares of client {owner}'s secret")
