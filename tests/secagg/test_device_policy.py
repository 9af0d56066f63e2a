"""The device decides what protects it: crafted server requests are refused before anything is sent, and a
server that shows clients different survivor sets (split view) cannot get both secrets of one client."""

import numpy as np
import pytest

from fedpeft.secagg import shamir
from fedpeft.secagg.protocol import LIMBS, SecAggClient, SecAggRefused, SecAggServer, default_threshold

TAG = b"run-1|round-1"


@pytest.mark.parametrize(
    "neighbours,t,match",
    [
        ([], 1, "0 neighbour"),  # k = 0: the update would be masked by its own seed only
        ([1], 2, "1 neighbour"),  # below the device's default floor of 2
        ([1, 2, 3], 1, "threshold 1 for 4"),  # one holder (or the client itself) would reveal a secret
        ([1, 2, 3], 2, "strict majority"),  # two disjoint pairs of holders could each reconstruct
        ([1, 2, 3], 5, "threshold 5"),  # more than the holders: never reconstructible
        ([0, 1, 2], 2, "malformed"),  # itself as its own neighbour
        ([1, 1, 2], 2, "malformed"),
    ],
)
def test_a_crafted_stage_one_request_is_refused(neighbours: list[int], t: int, match: str) -> None:
    with pytest.raises(SecAggRefused, match=match):
        SecAggClient(0, neighbours, t, TAG)


def test_the_device_floor_is_its_own() -> None:
    SecAggClient(0, [1], 2, TAG, min_neighbours=1)  # a device that accepts one neighbour may
    with pytest.raises(SecAggRefused, match="at least 3"):
        SecAggClient(0, [1, 2], 2, TAG, min_neighbours=3)


def _through_stage_two(n: int, t: int) -> tuple[SecAggServer, dict[int, SecAggClient], dict]:
    ids = list(range(n))
    server = SecAggServer(ids, n - 1, t, TAG, 64, seed=0)
    clients = {c: SecAggClient(c, server.graph[c], t, TAG) for c in ids}
    keys_for = server.receive_keys({c: clients[c].advertise() for c in ids})
    routed = server.receive_shares({c: clients[c].share_keys(keys_for[c]) for c in ids})
    return server, clients, routed


@pytest.mark.parametrize("alive", [[], [1]])
def test_masking_with_too_few_live_neighbours_is_refused_before_training(alive: list[int]) -> None:
    """A server that claims the neighbours dropped would leave the update under the self-mask alone (which
    it rebuilds in stage 5) or under one pairwise mask a colluding neighbour can remove."""
    _, clients, routed = _through_stage_two(5, 3)
    with pytest.raises(SecAggRefused, match="live neighbour"):
        clients[0].accept_shares(routed[0][0], alive)
    assert not clients[0]._sent_input


def test_a_client_signs_one_survivor_set_per_round() -> None:
    server, clients, routed = _through_stage_two(4, 3)
    for c, client in clients.items():
        client.masked_input(*routed[c], np.zeros(64, np.uint32))
    clients[0].sign_survivors([0, 1, 2, 3])
    with pytest.raises(SecAggRefused, match="two different survivor sets"):
        clients[0].sign_survivors([0, 1, 2])


def test_split_view_never_yields_both_secrets_of_one_client() -> None:
    """The server tells clients 0-2 that all five survived (to get client 0's self-mask seed b) and clients
    3-4 that client 0 dropped (to get its mask key s). Each side signs what it was shown; only the side with
    t signatures of its share holders on its set answers, so the server learns one of 0's secrets at most."""
    n, t = 5, 3
    server, clients, routed = _through_stage_two(n, t)
    for c, client in clients.items():
        client.masked_input(*routed[c], np.full(64, c, np.uint32))
    everyone, without_0 = [0, 1, 2, 3, 4], [1, 2, 3, 4]
    signatures = {c: clients[c].sign_survivors(everyone) for c in (0, 1, 2)}
    signatures |= {c: clients[c].sign_survivors(without_0) for c in (3, 4)}
    b_shares, s_shares = {}, {}
    for c in range(n):  # the server relays every signature it has to everyone, on both views
        view, dropped = (everyone, []) if c < 3 else (without_0, [0])
        try:
            b, s = clients[c].unmask(view, dropped, signatures)
        except SecAggRefused as e:
            assert c >= 3 and "fewer than the threshold" in str(e)
            continue
        b_shares |= {c: b[0]} if 0 in b else {}
        s_shares |= {c: s[0]} if 0 in s else {}
    assert len(b_shares) == 3 and not s_shares  # 0's seed (it did survive), never its mask key
    # and with the threshold the devices insist on, even the shares that do flow cannot be combined twice
    assert t == default_threshold(n - 1, n)
    assert len(shamir.combine({c + 1: shamir.decode_share(v, LIMBS) for c, v in b_shares.items()}, t)) == 32


def test_forged_or_foreign_signatures_do_not_count() -> None:
    server, clients, routed = _through_stage_two(5, 3)
    for c, client in clients.items():
        client.masked_input(*routed[c], np.zeros(64, np.uint32))
    everyone = list(range(5))
    real = {c: clients[c].sign_survivors(everyone) for c in (0, 1)}
    forged = {2: bytes(64), 3: real[1]}  # garbage, and client 1's signature passed off as client 3's
    with pytest.raises(SecAggRefused, match="2 of client 0's share holders"):
        clients[0].unmask(everyone, [], real | forged)


def test_no_setting_lets_an_update_go_out_under_its_self_mask_alone() -> None:
    with pytest.raises(SecAggRefused, match="0 neighbour"):
        SecAggClient(0, [], 1, TAG, min_neighbours=0)
    _, clients, routed = _through_stage_two(3, 2)
    clients[0].min_neighbours = 0  # as if the device's own node config said 0
    with pytest.raises(SecAggRefused, match="live neighbour"):
        clients[0].accept_shares(routed[0][0], [])
