"""SecAgg+ as two state machines, one per client and one for the server, without any transport.

Stages (Bell et al., CCS 2020, Fig. 1; Bonawitz et al., CCS 2017, Fig. 4):
  1. advertise keys   client -> server: two X25519 public keys (c: share encryption, s: masks)
  2. share keys       server forwards neighbours' keys; client Shamir-shares its self-mask seed b and its
                      mask private key s_sk among itself and its neighbours (threshold t) and sends each
                      neighbour's shares AES-GCM-encrypted under their c-key agreement, through the server
  3. masked input     client receives the ciphertexts addressed to it and sends
                        y_i = x_i + PRG(b_i) + sum_{j in N(i), j > i} PRG(k_ij) - sum_{j in N(i), j < i} PRG(k_ij)  (mod 2^32)
  4. unmask           for each surviving client the server collects t shares of b_i, for each client that
                      dropped after stage 2 t shares of s_sk (never both for one client), and removes the masks.

Clients are integer ids; Shamir points are id + 1. The server sees only public keys, ciphertexts, masked
vectors and the shares it asks for in stage 4; the sum is all it can compute (see README, threat model).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag

from fedpeft.secagg import crypto, shamir
from fedpeft.secagg.graph import neighbours as make_graph

LIMBS = crypto.SEED_BYTES // 2  # a 32-byte secret is 16 limbs


class SecAggAbort(Exception):
    """Too few clients survived a stage for the sum to be recovered; nothing about any input is revealed."""


def default_threshold(k: int, n: int) -> int:
    """A majority of the k + 1 holders of each secret (a client and its neighbours)."""
    holders = min(k, n - 1) + 1
    return holders // 2 + 1


def _info(purpose: str, tag: bytes, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return purpose.encode() + b"|" + tag + struct.pack("<QQ", lo, hi)


def commit(tag: bytes, seed: bytes) -> bytes:
    """A hash commitment to a 256-bit random seed: reveals nothing usable about it, binds it for stage 4."""
    return hashlib.sha256(b"fedpeft-secagg-b|" + tag + seed).digest()


def _pair_mask(
    private: crypto.X25519PrivateKey, peer_public: bytes, tag: bytes, me: int, peer: int, dim: int
) -> np.ndarray:
    return crypto.mask(crypto.agree(private, peer_public, _info("mask", tag, me, peer)), dim)


@dataclass
class SecAggClient:
    me: int
    neighbours: list[int]
    t: int
    tag: bytes  # binds keys, ciphertexts and masks to one run and round
    _c_sk: crypto.X25519PrivateKey | None = None
    _s_sk: crypto.X25519PrivateKey | None = None
    _keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # neighbour -> (c_pk, s_pk)
    _b: bytes = b""
    _held: dict[int, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )  # owner -> (b share, s share)
    _sent_input: bool = False

    def advertise(self) -> tuple[bytes, bytes]:
        self._c_sk, c_pk = crypto.new_keypair()
        self._s_sk, s_pk = crypto.new_keypair()
        return c_pk, s_pk

    def share_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> tuple[dict[int, bytes], bytes]:
        """keys: the public keys of the neighbours that advertised. Returns ({neighbour: ciphertext}, a hash
        commitment to the self-mask seed, which lets the server tell a bad share from a good one in stage 4)."""
        self._keys = {j: keys[j] for j in self.neighbours if j in keys}
        holders = sorted([self.me, *self._keys])
        if len(holders) < self.t:
            raise SecAggAbort(f"client {self.me}: {len(holders)} share holders < threshold {self.t}")
        self._b = os.urandom(crypto.SEED_BYTES)
        b_shares = shamir.split(self._b, [h + 1 for h in holders], self.t)
        s_shares = shamir.split(crypto.private_bytes(self._s_sk), [h + 1 for h in holders], self.t)
        self._held = {self.me: (b_shares[self.me + 1], s_shares[self.me + 1])}
        out = {}
        for j in self._keys:
            plain = (
                struct.pack("<QQ", self.me, j)
                + shamir.encode_share(b_shares[j + 1])
                + shamir.encode_share(s_shares[j + 1])
            )
            key = crypto.agree(self._c_sk, self._keys[j][0], _info("share", self.tag, self.me, j))
            out[j] = crypto.encrypt(key, plain, self.tag)
        return out, commit(self.tag, self._b)

    def masked_input(
        self, ciphertexts: dict[int, bytes], alive: list[int], x: np.ndarray
    ) -> tuple[np.ndarray, list[int]]:
        """ciphertexts: {sender: share ciphertext for me}; alive: clients that completed stage 2; x: the ring-
        encoded input [D] uint32. Returns (masked vector, neighbours whose shares were malformed)."""
        malformed = []
        for j, ct in ciphertexts.items():
            if j not in self._keys:
                malformed.append(j)
                continue
            try:
                key = crypto.agree(self._c_sk, self._keys[j][0], _info("share", self.tag, self.me, j))
                plain = crypto.decrypt(key, ct, self.tag)
                sender, receiver = struct.unpack("<QQ", plain[:16])
                if (sender, receiver) != (j, self.me):
                    raise ValueError("misaddressed share")
                b = shamir.decode_share(plain[16 : 16 + 4 * LIMBS], LIMBS)
                s = shamir.decode_share(plain[16 + 4 * LIMBS :], LIMBS)
                self._held[j] = (b, s)
            except (InvalidTag, ValueError, struct.error):
                malformed.append(j)
        y = x.astype(np.uint32) + crypto.mask(self._b, len(x))
        # No pairwise mask with a neighbour whose shares we cannot hold: if it is excluded later, its mask
        # key must be reconstructible from the shares of the clients that did mask with it.
        masked_with = [j for j in self._keys if j in set(alive) and j not in malformed]
        for j in masked_with:
            m = _pair_mask(self._s_sk, self._keys[j][1], self.tag, self.me, j, len(x))
            y = y + m if j > self.me else y - m  # uint32 arithmetic wraps: this is mod 2^32
        self._sent_input = True
        return y, sorted(malformed)

    def unmask(self, survivors: list[int], dropped: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Shares of b for survivors and of s_sk for dropped clients, for the owners whose shares this client
        holds. Refuses any request that would reveal both secrets of one client."""
        if not self._sent_input:
            raise SecAggAbort(f"client {self.me}: unmask before masked input")
        if set(survivors) & set(dropped):
            raise SecAggAbort(f"client {self.me}: a client cannot both survive and drop")
        b = {j: shamir.encode_share(self._held[j][0]) for j in survivors if j in self._held}
        s = {j: shamir.encode_share(self._held[j][1]) for j in dropped if j in self._held and j != self.me}
        return b, s


@dataclass
class SecAggServer:
    clients: list[int]
    k: int
    t: int
    tag: bytes
    dim: int  # length of every masked vector (entries, weight included)
    seed: int = 0
    graph: dict[int, list[int]] = field(init=False)
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    routed: dict[int, dict[int, bytes]] = field(default_factory=dict)  # receiver -> sender -> ciphertext
    commitments: dict[int, bytes] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    masked_with: dict[int, set[int]] = field(default_factory=dict)  # client -> neighbours it masked with
    excluded: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.graph = make_graph(sorted(self.clients), self.k, self.seed)

    def receive_keys(self, keys: dict[int, tuple[bytes, bytes]]) -> dict[int, dict[int, tuple[bytes, bytes]]]:
        """Stage 1 -> 2: the keys each client gets (its neighbours' that advertised)."""
        self.keys = {c: v for c, v in keys.items() if c in self.graph and len(v[0]) == 32 and len(v[1]) == 32}
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

    def unmask(
        self,
        survivors: list[int],
        dropped: list[int],
        replies: dict[int, tuple[dict[int, bytes], dict[int, bytes]]],
    ) -> np.ndarray:
        """Stage 4: reconstruct and remove every mask; returns the sum of the survivors' inputs mod 2^32."""
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
                m = _pair_mask(s_sk, self.keys[peer][1], self.tag, owner, peer, self.dim)
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


def dump_client(c: SecAggClient) -> bytes:
    """A client's state between stages as bytes, for Flower's per-node context.state (a SuperNode may run
    each message in a fresh process). It holds private keys: it never leaves the device."""
    doc = {
        "me": c.me,
        "neighbours": c.neighbours,
        "t": c.t,
        "tag": c.tag.hex(),
        "c_sk": crypto.private_bytes(c._c_sk).hex() if c._c_sk else "",
        "s_sk": crypto.private_bytes(c._s_sk).hex() if c._s_sk else "",
        "keys": {str(j): [a.hex(), b.hex()] for j, (a, b) in c._keys.items()},
        "b": c._b.hex(),
        "held": {
            str(j): [shamir.encode_share(b).hex(), shamir.encode_share(s).hex()]
            for j, (b, s) in c._held.items()
        },
        "sent_input": c._sent_input,
    }
    return json.dumps(doc).encode()


def load_client(data: bytes) -> SecAggClient:
    d = json.loads(data)
    c = SecAggClient(d["me"], d["neighbours"], d["t"], bytes.fromhex(d["tag"]))
    c._c_sk = crypto.private_from_bytes(bytes.fromhex(d["c_sk"])) if d["c_sk"] else None
    c._s_sk = crypto.private_from_bytes(bytes.fromhex(d["s_sk"])) if d["s_sk"] else None
    c._keys = {int(j): (bytes.fromhex(a), bytes.fromhex(b)) for j, (a, b) in d["keys"].items()}
    c._b = bytes.fromhex(d["b"])
    c._held = {
        int(j): (shamir.decode_share(bytes.fromhex(b), LIMBS), shamir.decode_share(bytes.fromhex(s), LIMBS))
        for j, (b, s) in d["held"].items()
    }
    c._sent_input = d["sent_input"]
    return c
