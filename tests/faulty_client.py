"""A ClientApp whose clients misbehave by partition id, to test that the server survives them."""

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedpeft.federation.wire import arrays_to_record, record_to_arrays
from fedpeft.flower import client_app as real

app = ClientApp()
app.query()(real.describe)
app.evaluate()(real.evaluate)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if pid == 1:
        raise RuntimeError("disk full in the middle of training")
    reply = real.train(msg, context)
    delta = record_to_arrays(reply.content["delta"])
    first = sorted(delta)[0]
    if pid == 2:
        delta[first] = np.full_like(delta[first], np.nan)
    elif pid == 3:
        delta[first] = np.zeros((3, 3), np.float32)
    elif pid == 4:
        info = dict(reply.content["info"])
        # another base: its weights' source differs too (the federation is keyed by the source)
        reply.content["info"] = ConfigRecord({**info, "fingerprint": "0" * 64, "source": "0" * 64})
    elif pid == 5:
        delta["base_model.model.extra.lora_A.weight"] = np.zeros(2, np.float32)
    reply.content["delta"] = arrays_to_record(delta)
    return reply


# Secure aggregation: client 1 vanishes while training (stage 3), client 2 after sending its masked
# input (stage 4), so the server must remove 1's pairwise masks and still unmask 2's input.
secagg_dropouts = ClientApp()
secagg_dropouts.query()(real.describe)
secagg_dropouts.evaluate()(real.evaluate)


@secagg_dropouts.train()
def train_and_drop(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    stage = int(msg.content["task"].get("secagg-stage", 0))
    if (pid, stage) in ((1, 3), (2, 4)) or (pid == 1 and stage == 0):
        raise ConnectionError(f"client {pid} went away")
    return real.train(msg, context)


# All but two clients vanish before masking: fewer survivors than the threshold.
secagg_mass_dropout = ClientApp()
secagg_mass_dropout.query()(real.describe)
secagg_mass_dropout.evaluate()(real.evaluate)


@secagg_mass_dropout.train()
def train_mostly_gone(msg: Message, context: Context) -> Message:
    if int(context.node_config["partition-id"]) >= 2 and int(msg.content["task"].get("secagg-stage", 0)) == 3:
        raise ConnectionError("gone")
    return real.train(msg, context)


# Client 0 sends a destructive update: its LoRA B delta reversed and scaled 15x, so the mean of the round
# unlearns what training taught the tiny random base (which cannot be pushed much above uniform: ~+8% at
# most on the reference text). The forgetting guard must keep it out.
destructive = ClientApp()
destructive.query()(real.describe)
destructive.evaluate()(real.evaluate)


@destructive.train()
def train_destructively(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    if int(context.node_config["partition-id"]) == 0:
        delta = record_to_arrays(reply.content["delta"])
        reply.content["delta"] = arrays_to_record(
            {k: v * (-15 if ".lora_B." in k else 1) for k, v in delta.items()}
        )
    return reply
