"""A device's node config is typed: what `fedpeft client` writes is what the ClientApp reads, strictly."""

import pytest

from fedpeft.config.node import DeviceConfig
from fedpeft.errors import FedpeftError

NODE = DeviceConfig("/d/ann.txt", "ann", "/s/base/m", "/s/base", "/s", "/s/personal", True, 3)


def test_written_and_read_back() -> None:
    flat = NODE.to_node_config()
    assert (
        flat["data-path"] == "/d/ann.txt" and flat["require-secagg"] is True and flat["min-neighbours"] == 3
    )
    assert DeviceConfig.from_node_config(flat) == NODE


def test_a_simulated_node_has_none() -> None:
    assert DeviceConfig.from_node_config({"partition-id": 0, "num-partitions": 4}) is None


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
        DeviceConfig.from_node_config({**NODE.to_node_config(), key: value})


def test_the_policy_defaults_and_its_floor() -> None:
    flat = {k: v for k, v in NODE.to_node_config().items() if k not in ("require-secagg", "min-neighbours")}
    node = DeviceConfig.from_node_config(flat)
    assert node is not None and node.require_secagg is False and node.min_neighbours == 2
    assert DeviceConfig.from_node_config({**flat, "min-neighbours": 0}).min_neighbours == 1
    with pytest.raises(FedpeftError, match="'data-path' must be str"):
        DeviceConfig.from_node_config({**flat, "data-path": None})


def test_the_keys_are_those_every_node_config_toml_was_written_with() -> None:
    assert list(NODE.to_node_config()) == [
        "data-path", "name", "model", "cache-dir", "store", "personal-dir", "require-secagg",
        "min-neighbours", "max-memory", "min-local-noise", "rank", "compute-dtype", "quant",
    ]  # fmt: skip
    # a file written before the worker ran the ClientApp itself named its socket: still read
    assert DeviceConfig.from_node_config({**NODE.to_node_config(), "worker": "/x/worker.sock"}) == NODE


def test_an_older_file_still_reads() -> None:
    """Written before --max-memory took MiB as a float (an int there) and before the newer keys existed."""
    newer = ("min-local-noise", "rank", "compute-dtype", "quant")
    old = {k: v for k, v in NODE.to_node_config().items() if k not in newer}
    node = DeviceConfig.from_node_config({**old, "max-memory": 512})
    assert node is not None and node.max_memory == 512.0 and isinstance(node.max_memory, float)
    assert node.min_local_noise == 0.0 and node.compute_dtype == "" and node.rank == 0 and node.quant == ""
    with pytest.raises(FedpeftError, match="'max-memory' must be float, got True"):
        DeviceConfig.from_node_config({**old, "max-memory": True})


def test_a_compute_dtype_outside_the_choices_is_refused() -> None:
    assert (
        DeviceConfig.from_node_config({**NODE.to_node_config(), "compute-dtype": "bf16"}).compute_dtype
        == "bf16"
    )
    with pytest.raises(
        FedpeftError, match="'compute-dtype' must be one of auto, fp32, bf16, fp16, got 'fp64'"
    ):
        DeviceConfig.from_node_config({**NODE.to_node_config(), "compute-dtype": "fp64"})
