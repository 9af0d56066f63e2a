"""A device's node config, typed: `fedpeft client` writes it (node-config.toml beside the SuperNode) and the
ClientApp reads it on every message, then forwards the task to the device's resident worker (`worker`). In
simulation there is none (Flower's node config then holds only `partition-id`). Nothing the server sends
can change it: it carries the device's own security policy."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from fedpeft.config.tree import ComputeDtype
from fedpeft.errors import FedpeftError
from fedpeft.secagg.protocol import MIN_NEIGHBOURS

COMPUTE_CHOICES: tuple[str, ...] = typing.get_args(ComputeDtype)  # the config tree's, "" aside


@dataclass(frozen=True)
class DeviceNode:
    data_path: str  # the owner's own text: a .txt file or a folder of them
    name: str = ""  # the user name the server sees ("": the data file or folder name)
    model: str = ""  # this device's copy of the base (converted into the store)
    cache_dir: str = ""  # the store's base cache
    store: str = ""  # the device store
    personal_dir: str = ""  # the personal adapter store: never leaves the device
    require_secagg: bool = False  # refuse plain training rounds
    min_neighbours: int = MIN_NEIGHBOURS  # the fewest other clients this device's update is masked with
    worker: str = ""  # the resident worker's socket (fedpeft.device.worker); "": run each task in the ClientApp
    max_memory: int = 0  # MiB the training process may use (0: no limit): micro-batches that fit
    # distributed DP: the least noise this device adds itself, over its sensitivity (0: no floor); > 0
    # refuses any round in which its update would leave without it
    min_local_noise: float = 0.0
    # what this device computes in ("": as the federation's --compute-dtype says, whose `auto` the device
    # resolves itself): a device's own hardware decides, not the server (fedpeft.model.precision)
    compute_dtype: str = ""

    def to_node_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> DeviceNode | None:
        """The device's config, or None on a simulated node. A value of the wrong type is refused rather
        than read loosely: "false" must not turn a policy on or off."""
        if "data-path" not in node:
            return None
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in node:
                if f.default is dataclasses.MISSING:
                    raise FedpeftError(
                        f"node config has no {key!r}; restart the device with `fedpeft client`"
                    )
                continue
            value, want = node[key], type(f.default) if f.default is not dataclasses.MISSING else str
            if want is int and isinstance(value, bool) or not isinstance(value, want):
                raise FedpeftError(f"node config {key!r} must be {want.__name__}, got {value!r}")
            values[f.name] = value
        device = cls(**values)
        if device.compute_dtype and device.compute_dtype not in COMPUTE_CHOICES:
            raise FedpeftError(
                f"node config 'compute-dtype' must be one of {', '.join(COMPUTE_CHOICES)}, "
                f"got {device.compute_dtype!r}"
            )
        # never below 1, whatever the file says: with no neighbour the server alone unmasks the update
        return dataclasses.replace(device, min_neighbours=max(1, device.min_neighbours))
