"""The device decides what protects it: crafted server requests are refused before anything is sent, and a
server that lies about who is alive or shows clients different survivor sets (split view), alone or with one
colluding client, cannot remove a client's masks."""

import numpy as np
import pytest

from fedpeft.config.secagg_bounds import min_threshold
from fedpeft.secagg import shamir
from fedpeft.secagg.protocol import (
    LIMBS,
    SecAggClient,
    SecAggRefused,
    default_threshold,
    survivors_message,
)
from fedpeft.secagg.server_protocol import SecAggServer

TAG = b"run-1|round-1"


@pytest.mark.parametrize(
    "neighbours,t,match",
    [
        ([], 1, "0 neighbour"),  # k = 0: the update would be masked by its own seed only
        ([1], 2, "1 neighbour"),  # below the device's default floor of 2
        ([1, 2, 3], 1, "threshold 1 for 4"),  # one holder (or the client itself) would reveal a secret
        ([1, 2, 3], 2, "needs 3 to 4"),  # two disjoint pairs of holders could each reconstruct
        ([1, 2, 3, 4], 3, "needs 4 to 5"),  # a majority, but one colluder answering both ways splits it
        ([1, 2, 3], 5, "threshold 5"),  # more than the holders: never reconstructible
        ([0, 1, 2], 3, "malformed"),  # itself as its own neighbour
        ([1, 1, 2], 3, "malformed"),
    ],
)
def test_a_crafted_stage_one_request_is_refused(neighbours: list[int], t: int, match: str) -> None:
    with pytest.raises(SecAggRefused, match=match):
        SecAggClient(0, neighbours, t, TAG)


def test_the_device_floor_is_its_own() -> None:
    SecAggClient(0, [1], 2, TAG, min_neighbours=1)  # a device that accepts one neighbour may
    with pytest.raises(SecAggRefused, match="at least 3"):
        SecAggClient(0, [1, 2], 3, TAG, min_neighbours=3)
    assert [min_threshold(h, 1) for h in (2, 3, 4, 5)] == [2, 2, 3, 3]  # strict majorities
    assert [min_threshold(h, 2) for h in (3, 4, 5, 11)] == [3, 3, 4, 7]  # one colluder counted twice


def _setup(graph: dict[int, list[int]], t: int) -> tuple[dict[int, SecAggClient], dict, dict]:
    """Stages 1-2 with honest routing; returns the clients, their public keys, {receiver: {sender: ct}}."""
    clients = {c: SecAggClient(c, graph[c], t, TAG) for c in graph}
    keys = {c: clients[c].advertise() for c in graph}
    shares = {c: clients[c].share_keys({j: keys[j] for j in graph[c]}) for c in graph}
    cts = {c: {j: shares[j][0][c] for j in graph[c]} for c in graph}
    return clients, keys, cts


def _complete(n: int) -> dict[int, list[int]]:
    return {c: [j for j in range(n) if j != c] for c in range(n)}


def _ring(n: int, half: int) -> dict[int, list[int]]:
    return {c: sorted({(c + d) % n for d in range(-half, half + 1) if d}) for c in range(n)}


def _secret(replies: dict[int, tuple[dict, dict]], owner: int, which: int, t: int) -> bytes | None:
    points = {
        h + 1: shamir.decode_share(r[which][owner], LIMBS) for h, r in replies.items() if owner in r[which]
    }
    return shamir.combine(dict(list(points.items())[:t]), t) if len(points) >= t else None


@pytest.mark.parametrize("alive", [[], [1]])
def test_masking_with_too_few_live_neighbours_is_refused_before_training(alive: list[int]) -> None:
    """A server that claims the neighbours dropped would leave the update under the self-mask alone (which
    it rebuilds by design) or under one pairwise mask a colluding neighbour can remove. Driven through the
    message handler with real records: the local update (training) is never even called."""
    from flwr.app import ConfigRecord, RecordDict

    from fedpeft.secagg.client_stages import handle

    n, t, trained = 5, default_threshold(4, 5), []
    states = {c: RecordDict() for c in range(n)}
    server = SecAggServer(list(range(n)), n - 1, t, TAG, 9)
    base = {"tag": TAG, "t": t, "round": 1}

    def stage(c: int, task: dict, content: RecordDict | None = None) -> RecordDict:
        return handle({**base, **task}, content or RecordDict(), states[c], c, lambda: trained.append(c))

    keys = {}
    for c in range(n):
        r = stage(c, {"secagg-stage": 1, "me": c, "neighbours": ",".join(map(str, server.graph[c]))})
        keys[c] = tuple(bytes(r["keys"][x]) for x in "csv")
    keys_for = server.receive_keys(keys)
    shares = {}
    for c in range(n):
        pub = ConfigRecord({str(j): b"".join(k) for j, k in keys_for[c].items()})
        r = stage(c, {"secagg-stage": 2}, RecordDict({"pubkeys": pub}))
        shares[c] = ({int(j): bytes(v) for j, v in r["shares"].items()}, bytes(r["commitment"]["b"]))
    routed = server.receive_shares(shares)
    crafted = {"secagg-stage": 3, "alive": ",".join(map(str, alive)), "clip": 0.01, "max-clients": n}
    content = RecordDict({"ciphertexts": ConfigRecord({str(j): v for j, v in routed[0][0].items()})})
    with pytest.raises(SecAggRefused, match="live neighbour"):
        stage(0, {**crafted, "max-weight": 1.0}, content)
    assert not trained


def test_the_server_alone_cannot_unmask_by_calling_every_partner_dropped() -> None:
    """A server tells client 0 that only neighbours 1 and 7 are alive (so 0 masks with those two), then
    announces one consistent survivor set without 1 and 7 and calls them dropped, to rebuild 0's seed b
    from 0's other holders and 1's and 7's mask keys from theirs. Client 0 answers only with t signatures
    of itself and its partners: none can come, so 0's seed never leaves and the pair masks stay."""
    graph = _ring(8, 2)  # k = 4, 5 holders
    t = default_threshold(4, 8)  # 4
    clients, keys, cts = _setup(graph, t)
    x0 = np.arange(16, dtype=np.uint32)
    with pytest.raises(SecAggRefused, match="live neighbour"):  # two partners < t - 1: refused at once
        clients[0].accept_shares(cts[0], [1, 7])
    # with the floor lowered as far as it goes (a device that accepts it), the signatures still decide
    clients[0].t = 3
    clients[0].accept_shares(cts[0], [1, 7])
    clients[0].mask(x0)
    for c in range(1, 8):
        clients[c].accept_shares(cts[c], graph[c])
        clients[c].mask(np.zeros(16, np.uint32))
    survivors, dropped = [0, 2, 3, 4, 5, 6], [1, 7]
    signatures = {c: clients[c].sign_survivors(survivors) for c in survivors}
    with pytest.raises(SecAggRefused, match="1 of client 0 and its partners signed"):
        clients[0].unmask(survivors, dropped, signatures)


def test_a_second_masked_input_is_refused() -> None:
    """Two maskings under the same masks would reveal the difference of their inputs."""
    clients, _, cts = _setup(_complete(4), 3)
    clients[0].accept_shares(cts[0], [1, 2, 3])
    clients[0].mask(np.ones(8, np.uint32))
    with pytest.raises(SecAggRefused, match="already sent"):
        clients[0].mask(np.zeros(8, np.uint32))


def test_a_client_signs_one_survivor_set_per_round() -> None:
    clients, _, cts = _setup(_complete(4), 3)
    for c, client in clients.items():
        client.accept_shares(cts[c], [j for j in range(4) if j != c])
        client.mask(np.zeros(8, np.uint32))
    clients[0].sign_survivors([0, 1, 2, 3])
    with pytest.raises(SecAggRefused, match="two different survivor sets"):
        clients[0].sign_survivors([0, 1, 2])


@pytest.mark.parametrize("n,colluder", [(5, 4), (3, 2)])
def test_split_view_with_a_colluder_never_yields_both_secrets_of_one_client(n: int, colluder: int) -> None:
    """The server shows some holders of client 0's shares a survivor set with 0 (to rebuild its seed b) and
    the others a set without it (to rebuild its mask key), and a colluding client signs both sets and hands
    over its own shares of both secrets. With the threshold the devices insist on (2t > holders + 1: a
    majority of 5 or 3 would be 3 or 2), one of the two secrets stays out of reach."""
    t = default_threshold(n - 1, n)
    clients, _, cts = _setup(_complete(n), t)
    for c, client in clients.items():
        client.accept_shares(cts[c], [j for j in range(n) if j != c])
        client.mask(np.full(8, c, np.uint32))
    with_0, without_0 = list(range(n)), [c for c in range(n) if c != 0]
    honest = [c for c in range(n) if c != colluder]
    shown = {c: with_0 if c <= len(honest) // 2 - 1 else without_0 for c in honest}
    signatures = {c: clients[c].sign_survivors(shown[c]) for c in honest}
    forged = {tuple(v): clients[colluder]._v_sk.sign(survivors_message(TAG, v)) for v in (with_0, without_0)}
    replies = {}
    for c in honest:
        dropped = [0] if shown[c] is without_0 else []
        try:
            replies[c] = clients[c].unmask(
                shown[c], dropped, {**signatures, colluder: forged[tuple(shown[c])]}
            )
        except SecAggRefused as e:
            assert "fewer than the threshold" in str(e)
    held = clients[colluder]._held[0]
    replies[colluder] = ({0: shamir.encode_share(held[0])}, {0: shamir.encode_share(held[1])})
    assert _secret(replies, 0, 0, t) is None or _secret(replies, 0, 1, t) is None
