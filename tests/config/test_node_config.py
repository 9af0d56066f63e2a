"""A device's node config is typed: what `fedpeft client` writes is what the ClientApp reads, strictly."""

import pytest

from fedpeft.config.node import DeviceNode
from fedpeft.errors import FedpeftError

NODE = DeviceNode("/d/ann.txt", "ann", "/s/base/m", "/s/base", "/s", "/s/personal", True, 3)


def test_written_and_read_back() -> None:
    flat = NODE.to_node_config()
    assert (
        flat["data-path"] == "/d/ann.txt" and flat["require-secagg"] is True and flat["min-neighbours"] == 3
    )
    assert DeviceNode.from_node_config(flat) == NODE


def test_a_simulated_node_has_none() -> None:
    assert DeviceNode.from_node_config({"partition-id": 0, "num-partitions": 4}) is None


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("require-secagg", "false", "'require-secagg' must be bool"),
        ("min-neighbours", "2", "'min-neighbours' must be int"),
        ("min-neighbours", True, "'min-neighbours' must be int"),
        ("name", 7, "'name' must be str"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(key: str, value: object, match: str) -> None:
    with pytest.raises(FedpeftError, match=match):
        DeviceNode.from_node_config({**NODE.to_node_config(), key: value})


def test_the_policy_defaults_and_its_floor() -> None:
    flat = {k: v for k, v in NODE.to_node_config().items() if k not in ("require-secagg", "min-neighbours")}
    node = DeviceNode.from_node_config(flat)
    assert node is not None and node.require_secagg is False and node.min_neighbours == 2
    assert DeviceNode.from_node_config({**flat, "min-neighbours": 0}).min_neighbours == 1
    with pytest.raises(FedpeftError, match="'data-path' must be str"):
        DeviceNode.from_node_config({**flat, "data-path": None})
