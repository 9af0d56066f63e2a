"""SecAgg+ end to end in one process: exact sums, dropouts at every stage, malformed inputs, aborts."""

import numpy as np
import pytest

from fedpeft.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggRefused,
    default_threshold,
)
from fedpeft.secagg.server_protocol import SecAggServer

TAG = b"run-1|round-3"


def run(
    inputs: dict[int, np.ndarray],
    k: int,
    t: int,
    drop: dict[int, set[int]] | None = None,
    tamper=None,
    min_neighbours: int = 2,
) -> tuple[np.ndarray, SecAggServer, list[int]]:
    """Drive all five stages; drop[s] = clients that vanish before answering stage s (1..5)."""
    drop = {s: set(v) for s, v in (drop or {}).items()}
    ids = sorted(inputs)
    dim = len(next(iter(inputs.values())))
    server = SecAggServer(ids, k, t, TAG, dim, seed=5)
    clients = {c: SecAggClient(c, server.graph[c], t, TAG, min_neighbours) for c in ids}
    gone: set[int] = set()

    def alive(stage: int) -> list[int]:
        gone.update(drop.get(stage, set()))
        return [c for c in ids if c not in gone]

    keys_for = server.receive_keys({c: clients[c].advertise() for c in alive(1)})
    shares = {c: clients[c].share_keys(keys_for[c]) for c in alive(2) if c in keys_for}
    if tamper and "shares" in tamper:
        tamper["shares"](shares)
    routed = server.receive_shares(shares)
    masked = {
        c: clients[c].masked_input(routed[c][0], routed[c][1], inputs[c]) for c in alive(3) if c in routed
    }
    if tamper and "inputs" in tamper:
        tamper["inputs"](masked)
    survivors, dropped = server.receive_inputs(masked)
    signed = {c: clients[c].sign_survivors(survivors) for c in alive(4) if c in survivors}
    relayed = server.receive_signatures(survivors, signed)
    replies = {c: clients[c].unmask(survivors, dropped, relayed) for c in alive(5) if c in signed}
    if tamper and "unmask" in tamper:
        tamper["unmask"](replies)
    return server.unmask(survivors, dropped, replies), server, survivors


def _inputs(n: int, dim: int = 1000, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: rng.integers(0, 2**32, size=dim, dtype=np.uint32) for c in range(n)}


def _expected(inputs: dict[int, np.ndarray], survivors: list[int]) -> np.ndarray:
    total = np.zeros(len(next(iter(inputs.values()))), np.uint64)
    for c in survivors:
        total += inputs[c]
    return (total % 2**32).astype(np.uint32)


@pytest.mark.parametrize("n,k", [(2, 1), (5, 4), (12, 4), (30, 6)])
def test_exact_sum_without_dropouts(n: int, k: int) -> None:
    from fedpeft.config.secagg_bounds import degree, min_threshold

    inputs = _inputs(n)
    m = min(2, n - 1)  # two clients: a device that accepts one neighbour
    t = min_threshold(degree(k, n) + 1, m)
    total, _, survivors = run(inputs, k, t, min_neighbours=m)
    assert survivors == list(range(n))
    np.testing.assert_array_equal(total, _expected(inputs, survivors))


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_dropouts_at_each_stage_up_to_n_minus_t(stage: int) -> None:
    n, k = 8, 7  # complete graph: each secret has n holders, t of them suffice
    t = default_threshold(k, n)  # 5
    inputs = _inputs(n, seed=stage)
    dropped = set(range(n - t))  # n - t = 3 clients vanish before this stage
    total, _, survivors = run(inputs, k, t, drop={stage: dropped})
    expected_survivors = [c for c in range(n) if stage >= 4 or c not in dropped]
    assert survivors == expected_survivors
    np.testing.assert_array_equal(total, _expected(inputs, survivors))


def test_dropouts_in_a_sparse_graph_across_stages() -> None:
    n, k = 20, 6
    t = default_threshold(k, n)  # 5 of 7 holders (one colluder counted twice)
    inputs = _inputs(n, seed=9)
    total, _, survivors = run(inputs, k, t, drop={2: {3}, 3: {11}, 4: {5}})
    assert 3 not in survivors and 11 not in survivors and 5 in survivors  # t = 5 of 7 holders
    np.testing.assert_array_equal(total, _expected(inputs, survivors))


def test_too_many_dropouts_abort_cleanly() -> None:
    n, k = 6, 5
    t = default_threshold(k, n)  # 4
    with pytest.raises(SecAggAbort, match="threshold"):
        run(_inputs(n), k, t, drop={3: {0, 1, 2}})  # 3 survivors < t


def test_a_single_masked_vector_looks_uniform() -> None:
    """What the server sees of one client is indistinguishable from uniform, even for an all-zero input."""
    n, k = 4, 3
    t = default_threshold(k, n)
    zeros = {c: np.zeros(1 << 18, np.uint32) for c in range(n)}
    seen = {}

    def grab(masked):
        seen.update({c: y for c, (y, _) in masked.items()})

    run(zeros, k, t, tamper={"inputs": grab})
    counts = np.bincount(seen[0] >> 24, minlength=256)
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum()
    assert chi2 < 350  # 255 dof, p ~ 1e-4
    assert not np.array_equal(seen[0], seen[1])


def test_server_cannot_unmask_with_fewer_than_t_shares() -> None:
    n, k = 6, 5
    t = default_threshold(k, n)
    inputs = _inputs(n)

    def starve(replies):  # keep only t - 1 holders' answers
        for c in list(replies)[t - 1 :]:
            del replies[c]

    with pytest.raises(SecAggAbort):
        run(inputs, k, t, tamper={"unmask": starve})


def test_client_refuses_to_reveal_both_secrets_of_one_client() -> None:
    client = SecAggClient(0, [1, 2], 3, TAG)
    client.advertise()
    client._sent_input = True
    client.sign_survivors([0, 1])
    with pytest.raises(SecAggRefused, match="both survived and dropped"):
        client.unmask([0, 1], [1], {})


def test_malformed_shares_exclude_their_sender() -> None:
    n, k = 8, 7
    t = default_threshold(k, n)
    inputs = _inputs(n, seed=4)

    def corrupt(shares):  # client 2 sends garbage to everyone
        out, commitment = shares[2]
        shares[2] = ({j: b"\x00" * len(ct) for j, ct in out.items()}, commitment)

    total, server, survivors = run(inputs, k, t, tamper={"shares": corrupt})
    assert 2 not in survivors and "could not decrypt" in server.excluded[2]
    np.testing.assert_array_equal(total, _expected(inputs, survivors))


def test_wrong_length_vector_excludes_its_sender() -> None:
    n, k = 6, 5
    t = default_threshold(k, n)
    inputs = _inputs(n, seed=6)

    def shorten(masked):
        y, bad = masked[4]
        masked[4] = (y[:-1], bad)

    total, server, survivors = run(inputs, k, t, tamper={"inputs": shorten})
    assert 4 not in survivors and "shape" in server.excluded[4]
    np.testing.assert_array_equal(total, _expected(inputs, survivors))


def test_a_bad_share_at_unmask_is_outvoted_by_the_commitment() -> None:
    n, k = 7, 6
    t = default_threshold(k, n)
    inputs = _inputs(n, seed=8)

    def lie(replies):  # one holder returns a wrong share of client 0's self-mask seed
        b, s = replies[1]
        arr = np.frombuffer(b[0], dtype="<u4").copy()
        arr[0] ^= 1
        replies[1] = ({**b, 0: arr.tobytes()}, s)

    total, _, survivors = run(inputs, k, t, tamper={"unmask": lie})
    np.testing.assert_array_equal(total, _expected(inputs, survivors))


def test_client_state_survives_a_round_trip_through_bytes() -> None:
    """Between stages the client's state lives in Flower's context.state as bytes."""
    from fedpeft.secagg.protocol import dump_client, load_client

    n, k = 5, 4
    t = default_threshold(k, n)
    inputs = _inputs(n, seed=2)
    ids = list(range(n))
    server = SecAggServer(ids, k, t, TAG, 1000, seed=1)
    clients = {c: SecAggClient(c, server.graph[c], t, TAG) for c in ids}
    hop = lambda c: load_client(dump_client(c))  # noqa: E731
    keys_for = server.receive_keys({c: clients[c].advertise() for c in ids})
    clients = {c: hop(v) for c, v in clients.items()}
    routed = server.receive_shares({c: clients[c].share_keys(keys_for[c]) for c in ids})
    clients = {c: hop(v) for c, v in clients.items()}
    survivors, dropped = server.receive_inputs(
        {c: clients[c].masked_input(*routed[c], inputs[c]) for c in ids}
    )
    clients = {c: hop(v) for c, v in clients.items()}
    signed = server.receive_signatures(survivors, {c: clients[c].sign_survivors(survivors) for c in ids})
    clients = {c: hop(v) for c, v in clients.items()}
    total = server.unmask(survivors, dropped, {c: clients[c].unmask(survivors, dropped, signed) for c in ids})
    np.testing.assert_array_equal(total, _expected(inputs, ids))
