"""A ClientApp whose clients misbehave by partition id, to test that the server survives them."""

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import app as real

app = ClientApp()
app.query()(real.describe)
app.evaluate()(real.evaluate)


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    if pid == 1:
        raise RuntimeError("disk full in the middle of training")
    reply = real.train(msg, context)
    delta = real.record_to_arrays(reply.content["delta"])
    first = sorted(delta)[0]
    if pid == 2:
        delta[first] = np.full_like(delta[first], np.nan)
    elif pid == 3:
        delta[first] = np.zeros((3, 3), np.float32)
    elif pid == 4:
        info = dict(reply.content["info"])
        reply.content["info"] = ConfigRecord({**info, "fingerprint": "0" * 64})
    elif pid == 5:
        delta["base_model.model.extra.lora_A.weight"] = np.zeros(2, np.float32)
    reply.content["delta"] = real.arrays_to_record(delta)
    return reply
