"""fedpeft/privacy/distributed.py and its place in secure aggregation: no wrap at the worst case, an
unbiased noised sum of the expected variance, a server that never sees a sum without noise, and the
device's own checks of the parameters it is sent."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.privacy.distributed import FLAG_SCALE, RING_MAX, DistributedCode
from fedpeft.secagg.client_stages import handle
from fedpeft.secagg.protocol import SecAggAbort, SecAggRefused
from fedpeft.secagg.server_stages import SecAggParams, secure_sum


@pytest.fixture(autouse=True)
def task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1


def _clipped(rng: np.random.Generator, dim: int, norm: float) -> np.ndarray:
    x = rng.normal(0, 1, dim)
    return x * norm / np.linalg.norm(x)


def test_the_worst_case_sum_cannot_wrap_and_one_client_more_is_refused() -> None:
    """max_clients clients, each with its whole norm on one coordinate and every noise draw at the clamp:
    the ring sum read as signed int32 is still the integer sum."""
    code = DistributedCode.for_round(clip=0.8, noise_multiplier=2.0, counted=9, max_clients=12, dim=1001)
    worst = math.floor(code.sensitivity) + code.clamp
    ring = np.zeros(code.dim, np.uint32)
    for _ in range(code.max_clients):
        ring = ring + np.full(code.dim, worst, np.int64).astype(np.uint32)
    assert int(ring.view(np.int32)[0]) == code.max_clients * worst <= RING_MAX
    neg = np.zeros(code.dim, np.uint32)
    for _ in range(code.max_clients):
        neg = neg + np.full(code.dim, -worst, np.int64).astype(np.uint32)
    assert int(neg.view(np.int32)[0]) == -code.max_clients * worst
    # the same granularity and noise for one client more could wrap: refused on both sides
    more = DistributedCode(code.clip, code.granularity, code.local_noise, code.max_clients + 1, code.dim)
    assert (code.max_clients + 1) * worst > RING_MAX  # the granularity is the finest that fits: no slack
    with pytest.raises(ValueError, match="could wrap"):
        more.check()
    with pytest.raises(ValueError, match="cannot hold"):
        DistributedCode.for_round(0.8, 1000.0, 1, 10_000, 10**6)


def test_the_noised_sum_is_unbiased_with_the_planned_variance() -> None:
    rng = np.random.default_rng(3)
    n, dim = 8, 20_000
    code = DistributedCode.for_round(clip=0.5, noise_multiplier=1.0, counted=n, max_clients=n, dim=dim + 1)
    xs = [_clipped(rng, dim, 0.5) for _ in range(n)]
    ring = np.zeros(code.dim, np.uint32)
    for i, x in enumerate(xs):
        ring = ring + code.encode(x, clipped=i < 3, rounding=rng, noise=rng)
    total, clipped = code.decode_sum(ring)
    err = total - np.sum(xs, axis=0)
    # n noise shares make the planned central noise: multiplier 1 x the (rounded, flagged) sensitivity
    want = code.noise_multiplier(n) * code.sensitivity * code.granularity
    assert code.noise_multiplier(n) == pytest.approx(1.0)
    assert err.std() == pytest.approx(want, rel=0.03)
    assert abs(err.mean()) < 5 * want / math.sqrt(dim)
    assert clipped == pytest.approx(3, abs=5 * want / (FLAG_SCALE * 0.5))
    # each client adds its share; the shares of 4 survivors make half the variance
    assert code.noise_multiplier(4) == pytest.approx(math.sqrt(0.5))


def _run(n: int, dim: int, code, fail=frozenset(), floor: float = 0.0, check=None):
    """A secure round through real Flower records, capturing every message the server receives."""
    rng = np.random.default_rng(5)
    vectors = {c: _clipped(rng, dim, 0.5) for c in range(n)}
    states = {c: RecordDict() for c in range(n)}
    seen: list[RecordDict] = []

    def send(payloads: dict[int, dict]) -> dict[int, Message]:
        out = {}
        for c, p in payloads.items():
            content = RecordDict({"task": ConfigRecord(p["task"])})
            for key, record in p.items():
                if key != "task":
                    content[key] = record
            msg = Message(content, dst_node_id=c + 1, message_type="train")
            if (c, int(p["task"]["secagg-stage"])) in fail:
                continue
            reply = handle(
                dict(content["task"]),
                content,
                states[c],
                c,
                lambda c=c: (vectors[c], 1.0, {"num-examples": 1.0, "dp_clipped": 1.0}),
                dp_clip=0.5,
                min_local_noise=floor,
            )
            seen.append(reply)
            out[c] = Message(reply, reply_to=msg)
        return out

    total, survivors, report = secure_sum(
        send, list(range(n)), dim + 1, code, SecAggParams(n, None), b"tag", 0, before_unmask=check
    )
    return total, survivors, vectors, seen, report


def test_the_server_never_sees_a_sum_without_noise() -> None:
    """Everything the server received: the masked inputs (each looks uniform), and what it can unmask is
    the survivors' sum plus their noise; the noise-free sum is nowhere, and no message carries the clipped
    flags in the clear."""
    n, dim = 6, 4000
    code = DistributedCode.for_round(clip=0.5, noise_multiplier=1.0, counted=n, max_clients=n, dim=dim + 1)
    total, survivors, vectors, seen, _ = _run(n, dim, code)
    assert survivors == list(range(n))
    noised, _ = code.decode_sum(total)
    clean = np.sum([vectors[c] for c in survivors], axis=0)
    err = noised - clean
    assert err.std() == pytest.approx(code.sensitivity * code.granularity, rel=0.1)
    masked = [r["masked"]["y"].numpy() for r in seen if "masked" in r]
    assert len(masked) == n
    sum_masked = np.zeros(dim + 1, np.uint32)
    for y in masked:
        sum_masked = sum_masked + y
    for candidate in [*masked, sum_masked]:  # a masked input or their sum: far from the clean sum
        decoded, _ = code.decode_sum(candidate)
        assert np.abs(decoded - clean).mean() > 10 * code.sensitivity * code.granularity
    assert all("dp_clipped" not in r["metrics"] for r in seen if "metrics" in r)


def test_dropouts_beyond_the_margin_are_checked_before_unmasking() -> None:
    """Two of six clients gone after keys: the check sees the four survivors whose noise is in the sum and
    can stop the round before anything is unmasked."""
    n, dim = 6, 500
    code = DistributedCode.for_round(clip=0.5, noise_multiplier=1.0, counted=5, max_clients=n, dim=dim + 1)
    seen: list[int] = []

    def check(survivors: list[int]) -> None:
        seen.append(len(survivors))
        if code.noise_multiplier(len(survivors)) < 1.0:
            raise SecAggAbort("too little noise")

    with pytest.raises(SecAggAbort, match="too little noise"):
        _run(n, dim, code, fail={(4, 3), (5, 3)}, check=check)
    assert seen == [4]


@pytest.mark.parametrize(
    ("change", "floor", "match"),
    [
        ({"dp-local-noise": 0.0}, 0.0, "positive and finite"),
        ({"dp-granularity": 1e-3}, 0.0, "too coarse"),
        ({"max-clients": 10**6}, 0.0, "could wrap"),
        ({}, 5.0, "at least 5"),
        (None, 0.1, "without distributed DP noise"),
    ],
)
def test_the_device_checks_what_it_is_asked_to_add(change, floor: float, match: str) -> None:
    """Each crafted stage-3 request is refused before training, nothing sent."""
    n, dim = 3, 200
    code = DistributedCode.for_round(clip=0.5, noise_multiplier=1.0, counted=n, max_clients=n, dim=dim + 1)

    class Crafted:
        def __init__(self) -> None:
            self.clip = 0.5

        def to_task(self) -> dict:
            if change is None:  # a plain (noise-free) encoding
                return {"clip": 0.5, "max-clients": n, "max-weight": 1.0}
            return {**code.to_task(), **change}

    with pytest.raises((SecAggAbort, SecAggRefused)):
        _run(n, dim, Crafted(), floor=floor)
    from fedpeft.secagg.client_stages import _stage3_code

    with pytest.raises(SecAggRefused, match=match):
        _stage3_code(Crafted().to_task(), 0.5, floor)
