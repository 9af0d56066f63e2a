"""A device's own options, the `device` section of the local config tree (fedpeft.config.local): `fedpeft
client` takes them as flags and writes them, resolved, to node-config.toml beside the SuperNode; the ClientApp,
run by the device's resident worker (fedpeft.device.worker), reads them from every task's context. In
simulation there is none (Flower's node config then holds only `partition-id`). They never enter Flower's
run config, so nothing the server sends can change them: they carry the device's own security policy.
Each field's node-config key is its name with dashes (`require-secagg`)."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, Literal

from fedpeft.config.fields import REQUIRED, choices, option
from fedpeft.config.secagg_bounds import MIN_NEIGHBOURS
from fedpeft.errors import FedpeftError

# "": as the federation's --compute-dtype says (its `auto` resolved by the device itself)
DeviceDtype = Literal["", "auto", "fp32", "bf16", "fp16"]
DeviceQuant = Literal["", "auto", "none", "bf16", "int8", "nf4"]
PROTECTION = "this device's protection (the server cannot lower it)"


@dataclass(frozen=True)
class DeviceConfig:
    data_path: str = option(
        REQUIRED, "this device's text: a .txt file or a folder of them", flag="--data", metavar="PATH"
    )
    name: str = option("", "user name the server sees (default: the data file or folder name)", flag="--name")
    model: str = option("")  # this device's copy of the base, converted into the store ("": the federation's)
    cache_dir: str = option("")  # the store's base cache
    store: str = option(
        "fedpeft-store",
        "local store for the converted base and this client's state",
        flag="--store",
        metavar="DIR",
    )
    personal_dir: str = option("")  # the personal adapter store: never leaves the device
    require_secagg: bool = option(
        False,
        "refuse plain training rounds: an update leaves this device only masked by secure aggregation",
        flag="--require-secagg",
        group=PROTECTION,
    )
    # The fewest other clients this device's update is masked with; read as at least 1 whatever the file
    # says, and `fedpeft client` refuses less (fedpeft.deploy.client)
    min_neighbours: int = option(
        MIN_NEIGHBOURS,
        "refuse a secure round that would mask this device's update with fewer than K other clients, or "
        "whose threshold the server and K-1 colluding clients could get around",
        flag="--min-neighbours",
        metavar="K",
        group=PROTECTION,
    )
    # the same option as the federation's train.max_memory, decided here by the device's owner
    max_memory: float = option(
        0.0,
        "MiB this device may hold at most, all its processes together (their PSS: a shared page counts "
        "once): the worker trains in what the SuperNode and the supervisor leave, the micro-batch shrinking "
        "with gradient accumulation keeping the batch, and the heap kept compact if that is what fits; a "
        "budget too small is refused naming the smallest that works (default: 0, no limit)",
        flag="--max-memory",
        metavar="MIB",
        ge=0,
    )
    # distributed DP: > 0 refuses any round in which this device's update would leave without this much
    # noise of its own
    min_local_noise: float = option(
        0.0,
        "send updates only under --dp distributed, adding at least Z x the sensitivity of discrete "
        "Gaussian noise itself: what protects this device's text even if every other client colludes with "
        "the server (default: no floor)",
        flag="--dp-min-local-noise",
        metavar="Z",
        ge=0,
        group=PROTECTION,
    )
    # HetLoRA: a device with less memory or compute trains a slice of the federation's LoRA rank
    rank: int = option(
        0,
        "the LoRA rank this device trains: the leading R rows and columns of the federation's adapter, "
        "which it keeps as its own (default 0: the federation's --lora-r)",
        flag="--rank",
        metavar="R",
        ge=0,
    )
    # a device's own hardware decides, not the server (fedpeft.model.precision)
    compute_dtype: DeviceDtype = option(
        "",
        "what this device's base computes in: fp32, bf16 or fp16; auto: what this machine does fast "
        "(default: the federation's --compute-dtype, whose auto this device resolves itself)",
        flag="--compute-dtype",
    )
    # a device's memory decides how it stores the base; the federation is keyed by the source weights
    # (fedpeft.model.fingerprint), so NF4, int8 and bf16 devices of one base join one federation
    quant: DeviceQuant = option(
        "",
        "how this device stores the base: none (fp32), bf16, int8 or nf4; auto: nf4 for large models, else "
        "bf16 (default: the federation's --quant)",
        flag="--quant",
    )

    def to_node_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_node_config(cls, node: dict[str, Any]) -> DeviceConfig | None:
        """The device's config, or None on a simulated node. A value of the wrong type is refused rather
        than read loosely: "false" must not turn a policy on or off."""
        if "data-path" not in node:
            return None
        hints = _hints()
        values = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key in node:
                values[f.name] = _node_value(key, node[key], hints[f.name])
            elif f.default is dataclasses.MISSING:
                raise FedpeftError(f"node config has no {key!r}; restart the device with `fedpeft client`")
        # never below 1, whatever the file says: with no neighbour the server alone unmasks the update
        device = cls(**values)
        return dataclasses.replace(device, min_neighbours=max(1, device.min_neighbours))


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(DeviceConfig)  # resolved once: the ClientApp reads the file every message


def _node_value(key: str, value: Any, hint: Any) -> Any:
    """One node-config value as its field's type, strictly (an int where a float is due is read, as files
    written before --max-memory took fractions hold one)."""
    options = choices(hint)
    want = str if options is not None else hint
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is int and isinstance(value, bool) or not isinstance(value, want):
        raise FedpeftError(f"node config {key!r} must be {want.__name__}, got {value!r}")
    if options is not None and value not in options:
        shown = ", ".join(o for o in options if o)
        raise FedpeftError(f"node config {key!r} must be one of {shown}, got {value!r}")
    return value


DeviceNode = DeviceConfig  # its former name, still used by tests and benchmarks
