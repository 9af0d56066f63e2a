"""SecAgg+ as two state machines without any transport: the client's here, the server's in
fedpeft.secagg.server_protocol (its Flower messages: fedpeft.secagg.client_stages and server_stages).

Stages (Bell et al., CCS 2020, Fig. 1; Bonawitz et al., CCS 2017, Fig. 4):
  1. advertise keys   client -> server: two X25519 public keys (c: share encryption, s: masks) and an
                      Ed25519 verification key (v: the consistency check), all fresh for this round
  2. share keys       server forwards neighbours' keys; client Shamir-shares its self-mask seed b and its
                      mask private key s_sk among itself and its neighbours (threshold t) and sends each
                      neighbour's shares AES-GCM-encrypted under their c-key agreement, through the server
  3. masked input     client receives the ciphertexts addressed to it and sends
                        y_i = x_i + PRG(b_i) + sum_{j in N(i), j > i} PRG(k_ij) - sum_{j in N(i), j < i} PRG(k_ij)  (mod 2^32)
  4. consistency      the server announces the survivors (whose inputs it sums); each client signs that set
                      once (Bonawitz et al., Fig. 4, ConsistencyCheck; Bell et al., active adversaries)
  5. unmask           a client that sees t valid signatures of its share holders on the very set it signed
                      reveals shares of b for the survivors and of s_sk for clients that dropped after
                      stage 2 (never both for one client); the server removes every mask.

The device decides what protects it. With its own minimum m (--min-neighbours, default 2) it resists the
server together with c = m - 1 colluding clients, whatever the server's parameters and messages say; it
refuses (SecAggRefused, nothing sent):
- a graph with fewer than m neighbours, or a threshold t with 2t <= holders + c (a server showing holders
  different survivor sets could then collect t shares of both secrets of one client: each honest holder
  reveals one of the two, a colluder both) or t <= m;
- a masking step with fewer live partners (neighbours it masks with) than max(m, t - 1);
- an unmask request without t valid signatures on the set it signed from itself and its partners: so at least
  t - 1 >= m partners are survivors, one of them honest, and no honest holder reveals that partner's mask
  key (else a server that calls every partner "dropped" could remove each pair mask with their keys);
- a stage out of order or repeated, a second survivor set to sign, a second masked input in one run's round.

Clients are integer ids; Shamir points are id + 1. The server sees only public keys, ciphertexts, masked
vectors, signatures and the shares it asks for in stage 5; the sum is all it can compute (docs/secagg.md,
"Threat model" and "Out of scope").
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag

from fedpeft.config.secagg_bounds import MIN_NEIGHBOURS, degree, min_threshold
from fedpeft.errors import FedpeftError
from fedpeft.secagg import crypto, shamir

LIMBS = crypto.SEED_BYTES // 2  # a 32-byte secret is 16 limbs
Keys = tuple[bytes, bytes, bytes]  # (c_pk, s_pk, v_pk) of one client


class SecAggAbort(Exception):
    """Too few clients survived a stage for the sum to be recovered; nothing about any input is revealed."""


class SecAggRefused(FedpeftError):
    """A device refused a request that would weaken its own protection; it sent nothing for it."""


def default_threshold(k: int, n: int) -> int:
    """The smallest threshold a device with the default minimum accepts, for n clients with k neighbours."""
    return min_threshold(degree(k, n) + 1)


def check_graph(me: int, neighbours: list[int], t: int, min_neighbours: int) -> None:
    """The device's own check of a stage-1 request; raises SecAggRefused."""
    if me in neighbours or len(set(neighbours)) != len(neighbours):
        raise SecAggRefused(f"refused: a malformed neighbour list for client {me}")
    if len(neighbours) < min_neighbours:
        raise SecAggRefused(
            f"refused: secure aggregation with {len(neighbours)} neighbour(s); this device masks its update "
            f"with at least {min_neighbours} (--min-neighbours)"
        )
    holders = len(neighbours) + 1
    lo = min_threshold(holders, min_neighbours)
    if not lo <= t <= holders:
        raise SecAggRefused(
            f"refused: threshold {t} for {holders} share holders; this device needs {lo} to {holders} "
            f"(a strict majority, counting {min_neighbours - 1} possible colluder(s) twice)"
        )


def survivors_message(tag: bytes, survivors: list[int]) -> bytes:
    """What a client signs in stage 4: this round's tag and the survivor set, in one canonical form."""
    return b"fedpeft-secagg-survivors|" + tag + b"|" + ",".join(map(str, sorted(survivors))).encode()


def _info(purpose: str, tag: bytes, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return purpose.encode() + b"|" + tag + struct.pack("<QQ", lo, hi)


def commit(tag: bytes, seed: bytes) -> bytes:
    """A hash commitment to a 256-bit random seed: reveals nothing usable about it, binds it for stage 5."""
    return hashlib.sha256(b"fedpeft-secagg-b|" + tag + seed).digest()


def pair_mask(
    private: crypto.X25519PrivateKey, peer_public: bytes, tag: bytes, me: int, peer: int, dim: int
) -> np.ndarray:
    return crypto.mask(crypto.agree(private, peer_public, _info("mask", tag, me, peer)), dim)


@dataclass
class SecAggClient:
    me: int
    neighbours: list[int]
    t: int
    tag: bytes  # binds keys, ciphertexts, masks and signatures to one run and round
    min_neighbours: int = MIN_NEIGHBOURS  # this device's floor, from its own configuration
    _c_sk: crypto.X25519PrivateKey | None = None
    _s_sk: crypto.X25519PrivateKey | None = None
    _v_sk: crypto.Ed25519PrivateKey | None = None
    _keys: dict[int, Keys] = field(default_factory=dict)  # neighbour -> its public keys
    _b: bytes = b""
    _held: dict[int, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )  # owner -> (b share, s share)
    _partners: list[int] = field(default_factory=list)  # neighbours whose pairwise masks we add
    _sent_input: bool = False
    _signed: list[int] | None = None  # the one survivor set this client signed this round
    stage: int = 1  # the last stage this client completed: each stage runs once, in order

    def __post_init__(self) -> None:
        # a hard floor whatever the device's setting says: with no neighbour the self-mask alone hides the
        # update, and the server rebuilds it in stage 5 by design
        self.min_neighbours = max(self.min_neighbours, 1)
        check_graph(self.me, self.neighbours, self.t, self.min_neighbours)

    def advertise(self) -> Keys:
        self._c_sk, c_pk = crypto.new_keypair()
        self._s_sk, s_pk = crypto.new_keypair()
        self._v_sk, v_pk = crypto.new_signing_key()
        return c_pk, s_pk, v_pk

    def share_keys(self, keys: dict[int, Keys]) -> tuple[dict[int, bytes], bytes]:
        """keys: the public keys of the neighbours that advertised. Returns ({neighbour: ciphertext}, a hash
        commitment to the self-mask seed, which lets the server tell a bad share from a good one in stage 5)."""
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

    def accept_shares(self, ciphertexts: dict[int, bytes], alive: list[int]) -> list[int]:
        """Stage 3, before any training: decrypt the shares addressed to us (ciphertexts: {sender: bytes})
        and fix the neighbours we will mask with (those in `alive` whose shares we hold). Refuses when they
        are fewer than this device's minimum. Returns the neighbours whose shares were malformed."""
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
        # No pairwise mask with a neighbour whose shares we cannot hold: if it is excluded later, its mask
        # key must be reconstructible from the shares of the clients that did mask with it.
        self._partners = sorted(j for j in self._keys if j in set(alive) and j not in malformed)
        # at least m partners; and t - 1, or stage 5 could never see t signatures of us and our partners
        need = max(self.min_neighbours, 1, self.t - 1)
        if len(self._partners) < need:
            raise SecAggRefused(
                f"refused: {len(self._partners)} live neighbour(s) to mask with; this device needs {need} "
                f"(--min-neighbours {self.min_neighbours}, threshold {self.t})"
            )
        return sorted(malformed)

    def mask(self, x: np.ndarray) -> np.ndarray:
        """The masked input for the ring-encoded x [D] uint32 (after accept_shares), once: two maskings of
        two inputs under the same masks would reveal their difference."""
        if self._sent_input:
            raise SecAggRefused(f"refused: client {self.me} already sent its masked input this round")
        y = x.astype(np.uint32) + crypto.mask(self._b, len(x))
        for j in self._partners:
            m = pair_mask(self._s_sk, self._keys[j][1], self.tag, self.me, j, len(x))
            y = y + m if j > self.me else y - m  # uint32 arithmetic wraps: this is mod 2^32
        self._sent_input = True
        return y

    def masked_input(
        self, ciphertexts: dict[int, bytes], alive: list[int], x: np.ndarray
    ) -> tuple[np.ndarray, list[int]]:
        """accept_shares then mask: (masked vector, neighbours whose shares were malformed)."""
        malformed = self.accept_shares(ciphertexts, alive)
        return self.mask(x), malformed

    def sign_survivors(self, survivors: list[int]) -> bytes:
        """Stage 4: sign the survivor set, once per round (an honest client never signs two sets)."""
        survivors = sorted(survivors)
        if not self._sent_input or self.me not in survivors:
            raise SecAggAbort(f"client {self.me}: asked to confirm survivors it is not part of")
        if self._signed is not None and self._signed != survivors:
            raise SecAggRefused(f"refused: client {self.me} was asked to sign two different survivor sets")
        self._signed = survivors
        return self._v_sk.sign(survivors_message(self.tag, survivors))

    def unmask(
        self, survivors: list[int], dropped: list[int], signatures: dict[int, bytes]
    ) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Stage 5: shares of b for survivors and of s_sk for dropped clients, for the owners whose shares
        this client holds; only for the survivor set it signed, and only once t of its share holders
        (itself and the partners it masked with) have signed that same set. Never both secrets of one client."""
        if self._signed is None or sorted(survivors) != self._signed:
            raise SecAggRefused(
                f"refused: client {self.me} was asked to unmask a survivor set it did not sign"
            )
        if set(survivors) & set(dropped):
            raise SecAggRefused(f"refused: client {self.me} was told a client both survived and dropped")
        message = survivors_message(self.tag, self._signed)
        verify_keys = {
            self.me: crypto.public_bytes(self._v_sk),
            **{j: self._keys[j][2] for j in self._partners},
        }
        valid = [
            j
            for j, sig in signatures.items()
            if j in verify_keys and j in self._signed and crypto.verify(verify_keys[j], sig, message)
        ]
        if len(valid) < self.t:
            raise SecAggRefused(
                f"refused: {len(valid)} of client {self.me} and its partners signed the survivor set, "
                f"fewer than the threshold {self.t}"
            )
        b = {j: shamir.encode_share(self._held[j][0]) for j in survivors if j in self._held}
        s = {j: shamir.encode_share(self._held[j][1]) for j in dropped if j in self._held and j != self.me}
        return b, s


def dump_client(c: SecAggClient) -> bytes:
    """A client's state between stages as bytes, for Flower's per-node context.state (a SuperNode may run
    each message in a fresh process). It holds private keys: it never leaves the device."""
    doc = {
        "me": c.me,
        "neighbours": c.neighbours,
        "t": c.t,
        "tag": c.tag.hex(),
        "min_neighbours": c.min_neighbours,
        "c_sk": crypto.private_bytes(c._c_sk).hex() if c._c_sk else "",
        "s_sk": crypto.private_bytes(c._s_sk).hex() if c._s_sk else "",
        "v_sk": crypto.private_bytes(c._v_sk).hex() if c._v_sk else "",
        "keys": {str(j): [x.hex() for x in keys] for j, keys in c._keys.items()},
        "b": c._b.hex(),
        "held": {
            str(j): [shamir.encode_share(b).hex(), shamir.encode_share(s).hex()]
            for j, (b, s) in c._held.items()
        },
        "partners": c._partners,
        "sent_input": c._sent_input,
        "signed": c._signed,
        "stage": c.stage,
    }
    return json.dumps(doc).encode()


def load_client(data: bytes) -> SecAggClient:
    d = json.loads(data)
    c = SecAggClient(d["me"], d["neighbours"], d["t"], bytes.fromhex(d["tag"]), d["min_neighbours"])
    c._c_sk = crypto.private_from_bytes(bytes.fromhex(d["c_sk"])) if d["c_sk"] else None
    c._s_sk = crypto.private_from_bytes(bytes.fromhex(d["s_sk"])) if d["s_sk"] else None
    c._v_sk = crypto.signing_key_from_bytes(bytes.fromhex(d["v_sk"])) if d["v_sk"] else None
    c._keys = {int(j): tuple(bytes.fromhex(x) for x in keys) for j, keys in d["keys"].items()}
    c._b = bytes.fromhex(d["b"])
    c._held = {
        int(j): (shamir.decode_share(bytes.fromhex(b), LIMBS), shamir.decode_share(bytes.fromhex(s), LIMBS))
        for j, (b, s) in d["held"].items()
    }
    c._partners = d["partners"]
    c._sent_input = d["sent_input"]
    c._signed = d["signed"]
    c.stage = d["stage"]
    return c
