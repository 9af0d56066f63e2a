"""Flower ClientApp: decode the message, call fedpeft.device, encode the reply. Nothing else.

Every message carries the run's flat config (fedpeft.config.to_run_config), so the same app serves
simulation and deployment:
- simulation: node config `partition-id` picks this virtual client's share of the run's data;
- deployment (`fedpeft client`): node config `data-path` is the device owner's own text, `name` its
  user name, `cache-dir` the local store for the converted base, `personal-dir` the store of the
  user's personal adapter and `model` an optional local copy of the base. The server assigns the client
  index (task "client") after registration. The device's own security policy is node config too:
  `require-secagg` (refuse plain training rounds) and `min-neighbours` (the fewest neighbours it masks its
  update with); nothing the server sends can lower either.
Personal adapters stay in the store: replies carry the shared keys' delta and scalar metrics only.
The base is loaded once per process (fedpeft.device.get_device). A SuperNode starts a fresh process per
message, so stages that need no model (secure-aggregation stages 1, 2, 4, 5) never import torch.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.records import arrays_to_record, record_to_arrays
from fedpeft.config import RunConfig
from fedpeft.config_io import from_run_config
from fedpeft.errors import FedpeftError
from fedpeft.node_config import DeviceNode

if TYPE_CHECKING:
    from fedpeft.device import Device

app = ClientApp()
INFO_KEY = "fedpeft-info"  # context.state: what this node reported last (fingerprint, name)
CLIENT_ERROR = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def user_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """A refusal for a reason the user can fix (another base, a foreign personal store) goes back as an error
    reply carrying its one-line reason, not as a traceback; a device also prints it to its own log.
    Anything else is a bug and keeps Flower's traceback."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedpeftError as e:
            if "data-path" in context.node_config:  # a device (not parsed again: it may be what failed)
                print(f"fedpeft: error: {e}", file=sys.stderr, flush=True)
            return Message(Error(code=CLIENT_ERROR, reason=str(e)), reply_to=msg)

    return wrapped


def _node(context: Context) -> DeviceNode | None:
    """This device's own node config (None on a simulated node): its data, store and security policy."""
    return DeviceNode.from_node_config(dict(context.node_config))


def _config(msg: Message, node: DeviceNode | None) -> RunConfig:
    cfg = from_run_config(dict(msg.content["config"]))
    if node is not None:  # a real device: its own copy of the base and its own cache
        base = replace(
            cfg.base, model=node.model or cfg.base.model, cache_dir=node.cache_dir or cfg.base.cache_dir
        )
        # the server's path means nothing here: a device keeps its personal adapters in its own store
        cfg = replace(cfg, base=base, personal=replace(cfg.personal, store=node.personal_dir))
    return cfg


class Setup(NamedTuple):
    device: Device
    local: int  # this process's data index
    client: int  # the client's index in the federation
    load_seconds: float  # spent loading the base for this message (0 when the process already held it)


def _setup(msg: Message, context: Context) -> Setup:
    start = time.perf_counter()
    from fedpeft.device import get_device

    node = _node(context)
    cfg = _config(msg, node)
    task = msg.content["task"]
    if node is not None:
        device, local = get_device(cfg, data_path=node.data_path, name=node.name), 0
    else:
        device, local = get_device(cfg), int(context.node_config["partition-id"])
    client = int(task.get("client", local))
    load_seconds = time.perf_counter() - start
    context.state[INFO_KEY] = ConfigRecord(
        {"fingerprint": device.fingerprint, "name": device.clients[local].user}
    )
    _check_base(task, device.fingerprint)
    return Setup(device, local, client, load_seconds)


def _check_base(task: ConfigRecord, mine: str) -> None:
    """Refuse before training: an update computed on another base would be meaningless to the federation."""
    expected = task.get("fingerprint")
    if expected and expected != mine:
        raise FedpeftError(
            f"refused: this device's base (fingerprint {mine[:16]}) differs from the federation's "
            f"({str(expected)[:16]}); use the same model file and --quant as the server"
        )


def _info(device: Device, local: int, client: int) -> ConfigRecord:
    data = device.clients[local]
    return ConfigRecord(
        {
            "fingerprint": device.fingerprint,
            "client": client,
            "name": data.user,
            "num-examples": data.train_tokens,
        }
    )


@app.query()
@user_errors
def describe(msg: Message, context: Context) -> Message:
    device, local, client, _ = _setup(msg, context)
    info = _info(device, local, client)
    if _node(context) is not None:
        del info["client"]  # a device has no index until the server assigns one
    content = RecordDict({"info": info})
    if msg.content["task"].get("with-init", False):
        content["description"] = ConfigRecord({"json": json.dumps(device.describe().to_json())})
        content["init"] = arrays_to_record(device.init_state)
    return Message(content, reply_to=msg)


def _min_neighbours(context: Context) -> int:
    from fedpeft.secagg.protocol import MIN_NEIGHBOURS

    node = _node(context)
    return MIN_NEIGHBOURS if node is None else node.min_neighbours


@app.train()
@user_errors
def train(msg: Message, context: Context) -> Message:
    task = msg.content["task"]
    if "secagg-stage" in task:
        return Message(_secagg_stage(msg, context), reply_to=msg)
    node = _node(context)
    if node is not None and node.require_secagg:
        raise FedpeftError(
            "refused: a plain training round; this device sends its update only under secure aggregation "
            "(--require-secagg)"
        )
    device, local, client, load_seconds = _setup(msg, context)
    result = device.fit(local, record_to_arrays(msg.content["arrays"]), int(task["round"]), client)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train_loss": result.train_loss,
            "train_seconds": result.seconds,
            "load_seconds": load_seconds,
            "personal_seconds": result.personal_seconds,
        }
    )
    content = RecordDict(
        {
            "delta": arrays_to_record(result.delta),
            "metrics": metrics,
            "info": _info(device, local, client),
        }
    )
    return Message(content, reply_to=msg)


def _secagg_stage(msg: Message, context: Context) -> RecordDict:
    """A secure-aggregation stage; the local training runs inside stage 3, right before masking. Only
    stage 3 loads the base; stage 1 checks the fingerprint this node reported last."""
    from fedpeft.federation import client_seed
    from fedpeft.secagg.flower import flatten, handle

    task = msg.content["task"]
    rnd, client = int(task["round"]), int(task["client"])
    if int(task["secagg-stage"]) == 1 and INFO_KEY in context.state:
        _check_base(task, str(context.state[INFO_KEY]["fingerprint"]))

    def local_update():
        device, local, _, load_seconds = _setup(msg, context)
        result = device.fit(local, record_to_arrays(msg.content["arrays"]), rnd, client)
        metrics = {
            "num-examples": float(result.num_examples),
            "train_loss": result.train_loss,
            "train_seconds": result.seconds,
            "load_seconds": load_seconds,
            "personal_seconds": result.personal_seconds,
        }
        return flatten(result.delta, device.keys), float(result.num_examples), metrics

    cfg = from_run_config(dict(msg.content["config"]))
    seed = client_seed(cfg.federation.seed, rnd, client)
    start = time.perf_counter()
    reply = handle(
        dict(task), msg.content, context.state, client, local_update, seed, _min_neighbours(context)
    )
    if (
        "metrics" in reply
    ):  # stage 3: what is left after loading and (personal) training is encoding and masking
        m = reply["metrics"]
        m["mask_seconds"] = (
            time.perf_counter()
            - start
            - float(m["load_seconds"])
            - float(m["train_seconds"])
            - float(m["personal_seconds"])
        )
    return reply


@app.evaluate()
@user_errors
def evaluate(msg: Message, context: Context) -> Message:
    device, local, client, _ = _setup(msg, context)
    task = msg.content["task"]
    arrays = record_to_arrays(msg.content["arrays"])
    content = RecordDict({"info": _info(device, local, client)})
    if task.get("personal", False) and device.method != "none":
        result = device.personalize(local, arrays, int(task["round"]), client)
        loss, tokens = result.pop("eval_loss"), result.pop("eval_tokens")
        content["personal"] = ConfigRecord(result)  # scalars and short strings: nothing of the adapter
    else:
        loss, tokens = device.evaluate(local, arrays)
    content["metrics"] = MetricRecord({"eval_loss": loss, "eval_tokens": tokens})
    return Message(content, reply_to=msg)
