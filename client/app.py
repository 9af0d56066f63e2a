"""Flower ClientApp: decode the message, call fedpeft.device, encode the reply. Nothing else.

Every message carries the run's flat config (fedpeft.config.to_run_config), so the same app serves
simulation and deployment. The base is loaded once per process (fedpeft.device.get_device).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import from_run_config
from fedpeft.device import Device, client_seed, get_device

app = ClientApp()


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Named arrays travel under their names, in schema order (never as an unnamed list)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in sorted(arrays)})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record}


def _setup(msg: Message, context: Context) -> tuple[Device, int]:
    cfg = from_run_config(dict(msg.content["config"]))
    client = int(context.node_config["partition-id"])
    return get_device(cfg), client


def _info(device: Device, client: int) -> ConfigRecord:
    data = device.clients[client]
    return ConfigRecord(
        {
            "fingerprint": device.fingerprint,
            "client": client,
            "name": data.user,
            "num-examples": data.train_tokens,
        }
    )


@app.query()
def describe(msg: Message, context: Context) -> Message:
    device, client = _setup(msg, context)
    content = RecordDict({"info": _info(device, client)})
    if msg.content["task"].get("with-init", False):
        content["description"] = ConfigRecord({"json": json.dumps(device.describe())})
        content["init"] = arrays_to_record(device.init_state)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    device, client = _setup(msg, context)
    task = msg.content["task"]
    if "secagg-stage" in task:
        return Message(_secagg_stage(msg, context, device, client), reply_to=msg)
    result = device.fit(client, record_to_arrays(msg.content["arrays"]), int(task["round"]))
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train_loss": result.train_loss,
            "train_seconds": result.seconds,
        }
    )
    content = RecordDict(
        {"delta": arrays_to_record(result.delta), "metrics": metrics, "info": _info(device, client)}
    )
    return Message(content, reply_to=msg)


def _secagg_stage(msg: Message, context: Context, device: Device, client: int) -> RecordDict:
    """A secure-aggregation stage; the local training runs inside stage 3, right before masking."""
    from fedpeft.secagg.flower import flatten, handle

    def local_update():
        result = device.fit(
            client, record_to_arrays(msg.content["arrays"]), int(msg.content["task"]["round"])
        )
        metrics = {
            "num-examples": float(result.num_examples),
            "train_loss": result.train_loss,
            "train_seconds": result.seconds,
        }
        return flatten(result.delta, device.keys), float(result.num_examples), metrics

    seed = client_seed(device.cfg.federation.seed, int(msg.content["task"]["round"]), client)
    reply = handle(dict(msg.content["task"]), msg.content, context.state, client, local_update, seed)
    extra = dict(reply["info"]) if "info" in reply else {}
    reply["info"] = ConfigRecord({**extra, **dict(_info(device, client))})
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    device, client = _setup(msg, context)
    loss, tokens = device.evaluate(client, record_to_arrays(msg.content["arrays"]))
    content = RecordDict(
        {"metrics": MetricRecord({"eval_loss": loss, "eval_tokens": tokens}), "info": _info(device, client)}
    )
    return Message(content, reply_to=msg)
