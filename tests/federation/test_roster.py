"""Registration without Flower: client indices, the base vote, who is on the federation's base."""

import logging

import pytest

from fedpeft.config.tree import FederationConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation.roster import Registration, make_roster, order, vote


def _device(node: int, name: str, fingerprint: str = "a", examples: float = 100.0) -> Registration:
    return Registration(node=node, name=name, fingerprint=fingerprint, examples=examples)


def _simulated(client: int, fingerprint: str = "a") -> Registration:
    return Registration(
        node=100 + client, name=f"user{client}", fingerprint=fingerprint, examples=10.0, client=client
    )


def test_registration_reads_a_device_and_a_simulated_client() -> None:
    device = Registration.from_info(7, {"name": "ann", "fingerprint": "f", "num-examples": 12})
    assert device == Registration(7, "ann", "f", 12.0, None)
    simulated = Registration.from_info(8, {"name": "bob", "fingerprint": "f", "num-examples": 3, "client": 4})
    assert simulated.client == 4 and simulated.examples == 3.0


def test_devices_are_indexed_by_name_then_node_id() -> None:
    replies = [_device(5, "carol"), _device(9, "ann"), _device(2, "bob"), _device(3, "ann")]
    assert [(r.name, r.node) for r in order(replies)] == [("ann", 3), ("ann", 9), ("bob", 2), ("carol", 5)]
    roster = make_roster(replies, [], want=10, min_clients=1)
    assert roster.node_of == {0: 3, 1: 9, 2: 2, 3: 5}
    assert roster.names == {0: "ann", 1: "ann", 2: "bob", 3: "carol"}


def test_more_devices_than_wanted_keeps_the_first_by_name(caplog: pytest.LogCaptureFixture) -> None:
    replies = [_device(1, "dave"), _device(2, "carol"), _device(3, "bob"), _device(4, "ann")]
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        roster = make_roster(replies, [], want=3, min_clients=1)
    assert roster.names == {0: "ann", 1: "bob", 2: "carol"}
    assert roster.node_of == {0: 4, 1: 3, 2: 2}
    assert "takes the first 3" in caplog.text


def test_simulated_clients_keep_their_partition_index() -> None:
    roster = make_roster([_simulated(2), _simulated(0), _simulated(1)], [], want=3, min_clients=1)
    assert roster.node_of == {0: 100, 1: 101, 2: 102}
    assert roster.names[2] == "user2" and roster.examples == {0: 10.0, 1: 10.0, 2: 10.0}


def test_the_most_common_base_wins_and_a_tie_goes_to_the_lowest_index() -> None:
    assert vote({0: "x", 1: "y", 2: "y"}) == "y"
    assert vote({0: "b", 1: "a", 2: "a", 3: "b"}) == "b"  # 2 against 2: client 0 holds b
    assert vote({3: "b", 1: "a", 2: "a", 0: "b"}) == "b"  # whatever order the dict was filled in
    assert vote({0: "x", 1: "y", 2: "y"}, pinned="x") == "x"


def test_devices_on_another_base_are_named_and_kept_off_base(caplog: pytest.LogCaptureFixture) -> None:
    replies = [_device(1, "ann", "old"), _device(2, "bob", "new"), _device(3, "carol", "new")]
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        roster = make_roster(replies, [], want=3, min_clients=1)
    assert roster.fingerprint == "new"
    assert roster.on_base() == [1, 2] and roster.off_base() == [0]
    assert "refused every round: ann" in caplog.text
    pinned = make_roster(replies, [], want=3, min_clients=1, pinned="old")
    assert pinned.on_base() == [0] and pinned.off_base() == [1, 2]


def test_no_client_on_the_pinned_base_is_an_error() -> None:
    with pytest.raises(FedpeftError, match="no client holds the federation's base zzz"):
        make_roster([_device(1, "ann"), _device(2, "bob")], [], want=2, min_clients=1, pinned="zzz")


def test_a_device_that_failed_to_start_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        roster = make_roster([_device(1, "ann"), _device(2, "bob")], ["disk full"], want=3, min_clients=2)
    assert roster.names == {0: "ann", 1: "bob"}
    assert "left out: disk full" in caplog.text


def test_a_simulated_client_that_failed_to_start_fails_the_run() -> None:
    with pytest.raises(FedpeftError, match="a client failed to start: no data"):
        make_roster([_simulated(0), _simulated(1)], ["no data"], want=3, min_clients=1)


def test_fewer_started_than_min_clients_is_an_error() -> None:
    with pytest.raises(FedpeftError, match="only 1 clients started; --min-clients is 2"):
        make_roster([_device(1, "ann")], [], want=3, min_clients=2)


def test_sampling_picks_among_the_registered_indices_and_tasks_name_client_and_base() -> None:
    roster = make_roster([_simulated(0), _simulated(3), _simulated(7)], [], want=10, min_clients=1)
    everyone = FederationConfig(clients=3, fraction=1.0, min_clients=1)
    assert roster.sample(everyone, 1) == [0, 3, 7]
    one = FederationConfig(clients=3, fraction=0.1, min_clients=1)
    picked = roster.sample(one, 2)
    assert len(picked) == 1 and picked[0] in (0, 3, 7) and picked == roster.sample(one, 2)
    assert roster.task(3, round=2) == {"round": 2, "client": 3, "fingerprint": "a"}


def _quantized(client: int, quant: str, source: str = "src") -> Registration:
    exact = f"{source}-{quant}"  # each quantization of one source has its own exact fingerprint
    return Registration(100 + client, f"user{client}", exact, 10.0, client, source=source, quant=quant)


def test_quantizations_of_one_source_join_and_each_is_recorded(caplog: pytest.LogCaptureFixture) -> None:
    info = {"name": "ann", "fingerprint": "f", "num-examples": 1, "source": "s", "quant": "nf4"}
    assert Registration.from_info(7, info).source == "s" and Registration.from_info(7, info).quant == "nf4"
    replies = [
        _quantized(0, "nf4"),
        _quantized(1, "bf16"),
        _quantized(2, "nf4"),
        _quantized(3, "bf16", "other"),
    ]
    with caplog.at_level(logging.INFO, logger="fedpeft"):
        roster = make_roster(replies, [], want=4, min_clients=1)
    assert roster.fingerprint == "src" and roster.on_base() == [0, 1, 2] and roster.off_base() == [3]
    assert roster.mixed_quants() == {0: "nf4", 1: "bf16", 2: "nf4"}
    assert "bf16 (1), nf4 (2)" in caplog.text


def test_a_pinned_exact_base_admits_that_quantization_only() -> None:
    replies = [_quantized(0, "nf4"), _quantized(1, "bf16"), _quantized(2, "nf4")]
    roster = make_roster(replies, [], want=3, min_clients=1, pinned="src-bf16")
    assert roster.on_base() == [1] and roster.mixed_quants() == {}
    assert make_roster(replies, [], want=3, min_clients=1, pinned="src").on_base() == [0, 1, 2]
    # a device that reports no source (an older device) is matched by its exact fingerprint alone
    old = Registration(9, "old", "src-nf4", 1.0, 3)
    assert make_roster([*replies, old], [], want=4, min_clients=1).off_base() == [3]
