"""Flower ClientApp: decode the message, run its task (fedpeft.device.tasks), encode the reply. Nothing else.

Every message carries the run's flat config (fedpeft.config.tree.to_run_config), so the same app serves
simulation and deployment:
- simulation: node config `partition-id` picks this virtual client's share of the run's data, and the task
  runs here, in the Ray actor that keeps the base loaded between messages;
- deployment (`fedpeft client`): the device's node config (fedpeft.config.node.DeviceConfig) names its text,
  store and base, and its security policy (`require-secagg`, `min-neighbours`: nothing the server sends can
  lower either). The device's resident worker (fedpeft.device.worker) runs this app in its own process,
  for every message, with the base, the data and the personal store loaded once.
Secure aggregation runs here, its state in Flower's context.state. Every reply that trains reports where
the device's time went (load, train, mask, personal, wait) and its `base_loads` and memory figures.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config.files import from_run_config
from fedpeft.config.node import DeviceConfig
from fedpeft.config.secagg_bounds import MIN_NEIGHBOURS
from fedpeft.device import tasks
from fedpeft.errors import FedpeftError
from fedpeft.federation.state import client_seed
from fedpeft.secagg.client_stages import handle
from fedpeft.secagg.protocol import SecAggAbort

app = ClientApp()
INFO_KEY = "fedpeft-info"  # context.state: what this node reported last (fingerprint, name)
WAIT_KEY = "fedpeft-wait"  # context.state: seconds this round's secure stages waited to start
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


def _node(context: Context) -> DeviceConfig | None:
    """This device's own node config (None on a simulated node): its data, store and security policy."""
    return DeviceConfig.from_node_config(dict(context.node_config))


def _waited(msg: Message) -> float:
    """Seconds from the server creating this message to its task starting here: the SuperNode's poll, the
    worker's claim and the transport. Across machines it includes their clock offset."""
    return max(0.0, time.time() - float(msg.metadata.created_at or time.time()))


def _run(kind: str, msg: Message, context: Context) -> RecordDict:
    """The task itself: on a device in its resident worker (this process), simulated in the Ray actor."""
    node = _node(context)
    partition = 0 if node is not None else int(context.node_config["partition-id"])
    reply = tasks.run(kind, msg.content, node, partition)
    if "info" in reply:
        info = reply["info"]
        context.state[INFO_KEY] = ConfigRecord(
            {"fingerprint": info["fingerprint"], "source": info["source"], "name": info["name"]}
        )
    return reply


@app.query()
@user_errors
def describe(msg: Message, context: Context) -> Message:
    return Message(_run("describe", msg, context), reply_to=msg)


def _min_neighbours(context: Context) -> int:
    node = _node(context)
    return MIN_NEIGHBOURS if node is None else node.min_neighbours


def _min_local_noise(context: Context) -> float:
    node = _node(context)
    return 0.0 if node is None else node.min_local_noise


@app.train()
@user_errors
def train(msg: Message, context: Context) -> Message:
    waited = _waited(msg)
    task = msg.content["task"]
    if "secagg-stage" in task:
        return Message(_secagg_stage(msg, context, waited), reply_to=msg)
    node = _node(context)
    if node is not None and node.require_secagg:
        raise FedpeftError(
            "refused: a plain training round; this device sends its update only under secure aggregation "
            "(--require-secagg)"
        )
    if node is not None and node.min_local_noise > 0:
        raise FedpeftError(
            "refused: a plain training round; this device sends its update only with its own noise inside "
            "secure aggregation (--dp-min-local-noise)"
        )
    reply = _run("train", msg, context)
    reply["metrics"] = MetricRecord({**reply["metrics"], "wait_seconds": waited})
    return Message(reply, reply_to=msg)


def _secagg_stage(msg: Message, context: Context, waited: float) -> RecordDict:
    """A secure-aggregation stage; the local training runs inside stage 3, right before masking. Stage 1
    checks the fingerprint this node reported last, so a device on another base never takes part."""
    task = msg.content["task"]
    rnd, client, stage = int(task["round"]), int(task["client"]), int(task["secagg-stage"])
    if stage == 1:
        if INFO_KEY in context.state:
            mine = context.state[INFO_KEY]
            tasks.check_base(task, str(mine["fingerprint"]), str(mine["source"]))
        context.state[WAIT_KEY] = MetricRecord({"seconds": 0.0})
    if WAIT_KEY in context.state:
        context.state[WAIT_KEY]["seconds"] = float(context.state[WAIT_KEY]["seconds"]) + waited

    def local_update():
        reply = _run("update", msg, context)
        metrics = {k: float(v) for k, v in reply["metrics"].items()}
        return reply["update"]["flat"].numpy(), metrics["num-examples"], metrics

    cfg = from_run_config(dict(msg.content["config"]))
    seed = client_seed(cfg.federation.seed, rnd, client)
    start = time.perf_counter()
    reply = handle(
        dict(task),
        msg.content,
        context.state,
        client,
        local_update,
        seed,
        _min_neighbours(context),
        dp_clip=cfg.privacy.clip,
        min_local_noise=_min_local_noise(context),
    )
    if (
        "metrics" in reply
    ):  # stage 3: what is left after loading and (personal) training is encoding and masking
        m = reply["metrics"]
        spent = sum(float(m[f"{s}_seconds"]) for s in ("load", "train", "personal"))
        m["mask_seconds"] = max(0.0, time.perf_counter() - start - spent)
        m["wait_seconds"] = float(context.state[WAIT_KEY]["seconds"]) if WAIT_KEY in context.state else waited
    return reply


def _advertise_ahead(msg: Message, context: Context) -> ConfigRecord | None:
    """Stage 1 of the next secure round, folded into this round's last message (the evaluation): the same
    checks and state as a stage-1 message. A refusal keeps the keys back; the server then asks in a
    stage-1 message of the next round, and the refusal is recorded there."""
    task, client = dict(msg.content["secagg-next"]), int(msg.content["task"]["client"])
    if int(task.get("secagg-stage", 0)) != 1:
        return None
    try:
        out = handle(task, msg.content, context.state, client, _no_update, None, _min_neighbours(context))
    except (SecAggAbort, FedpeftError) as e:
        if "data-path" in context.node_config:
            print(f"fedpeft: {e}", file=sys.stderr, flush=True)
        return None
    context.state[WAIT_KEY] = MetricRecord({"seconds": 0.0})
    return out["keys"]


def _no_update():
    raise AssertionError("stage 1 trains nothing")


@app.evaluate()
@user_errors
def evaluate(msg: Message, context: Context) -> Message:
    reply = _run("evaluate", msg, context)
    if "secagg-next" in msg.content and (keys := _advertise_ahead(msg, context)) is not None:
        reply["secagg-keys"] = keys
    return Message(reply, reply_to=msg)
