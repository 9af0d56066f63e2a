import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from fedpeft.secagg import crypto, shamir
from fedpeft.secagg.graph import neighbours
from fedpeft.secagg.quantize import RingCode


def test_shamir_any_t_shares_reconstruct() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, list(range(1, 8)), t=4)
    assert shamir.combine(shares, 4) == secret
    subset = {x: shares[x] for x in (2, 5, 6, 7)}
    assert shamir.combine(subset, 4) == secret


def test_shamir_fewer_than_t_shares_fail() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, list(range(1, 8)), t=4)
    few = {x: shares[x] for x in (1, 2, 3)}
    with pytest.raises(ValueError, match="3 shares, 4 needed"):
        shamir.combine(few, 4)
    # Interpolating t-1 shares as if the threshold were t-1 gives garbage, not the secret.
    with pytest.raises(ValueError):
        shamir.combine(few, 3)


def test_fewer_than_t_shares_look_the_same_for_any_secret() -> None:
    """Information-theoretic hiding: with t = 2, one share is secret + c1 * x mod p with c1 uniform, so its
    distribution does not depend on the secret. Compare the share at x = 1 for two very different secrets."""

    def top_bits(secret: bytes) -> np.ndarray:
        return np.array([shamir.split(secret, [1, 2], 2)[1][0] >> 27 for _ in range(4000)])  # 16 buckets

    for secret in (b"\x00\x00", b"\xff\xff"):
        counts = np.bincount(top_bits(secret), minlength=16)
        chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
        assert chi2 < 45  # 15 dof, p ~ 1e-4


def test_key_agreement_is_symmetric_and_aead_detects_tampering() -> None:
    a, a_pk = crypto.new_keypair()
    b, b_pk = crypto.new_keypair()
    ka, kb = crypto.agree(a, b_pk, b"info"), crypto.agree(b, a_pk, b"info")
    assert ka == kb and len(ka) == 32 and crypto.agree(a, b_pk, b"other") != ka
    ct = crypto.encrypt(ka, b"share", b"aad")
    assert crypto.decrypt(kb, ct, b"aad") == b"share"
    with pytest.raises(InvalidTag):
        crypto.decrypt(kb, ct[:-1] + bytes([ct[-1] ^ 1]), b"aad")
    with pytest.raises(InvalidTag):
        crypto.decrypt(kb, ct, b"other aad")


def test_mask_is_deterministic_per_seed_and_uniform() -> None:
    seed = os.urandom(32)
    m = crypto.mask(seed, 1 << 20)
    assert np.array_equal(m, crypto.mask(seed, 1 << 20)) and m.dtype == np.uint32
    assert not np.array_equal(m, crypto.mask(os.urandom(32), 1 << 20))
    counts = np.bincount(m >> 24, minlength=256)  # top byte: chi-square against uniform
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 350  # 255 dof: p ~ 1e-4 cut-off


def test_graph_is_symmetric_and_k_regular() -> None:
    g = neighbours(list(range(50)), 10, seed=3)
    assert all(len(v) == 10 and c not in v for c, v in g.items())
    assert all(c in g[d] for c, v in g.items() for d in v)
    assert neighbours(list(range(5)), 10, seed=0)[0] == [1, 2, 3, 4]


def test_ring_code_round_trip_and_no_wrap_at_the_documented_bounds() -> None:
    code = RingCode(clip=1e-3, max_clients=1000, max_weight=5000.0)
    rng = np.random.default_rng(0)
    # worst case: every one of n_max clients at +clip (then -clip) with the largest weight
    for sign in (1, -1):
        one = code.encode(np.full(4, sign * 1e-3), 5000.0, rng)
        total = np.zeros(5, np.uint32)
        for _ in range(1000):
            total = total + one
        mean_sum, weight = code.decode_sum(total)
        np.testing.assert_allclose(mean_sum, sign * 1.0, rtol=1e-6)
        assert weight == pytest.approx(1000.0, rel=1e-6)
    x = rng.normal(size=1000) * 3e-4
    got, w = code.decode_sum(code.encode(x, 2500.0, rng))
    np.testing.assert_allclose(got / w, np.clip(x, -1e-3, 1e-3), atol=2 / code.scale / w)
