"""Flower's own bare FedAvg federation, the reference for fedpeft's round at scale: a ClientApp that trains
nothing (it returns the array it got) and Flower's FedAvg strategy on its simulation engine, with the same
number of virtual clients, sampled share and array size as the fedpeft run beside it.

    python benchmarks/flower_bare.py --clients 1000 --fraction 0.01 --dim 41472 --rounds 3

Prints one JSON line: the seconds of each round (train and evaluate stages, from the strategy's own
round boundaries), measured in a fresh process with one client actor owning every core, as fedpeft's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "loss": 0.0})}), reply_to=msg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--fraction", type=float, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    marks: list[float] = []
    server_app = ServerApp()

    @server_app.main()
    def run(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=a.fraction, fraction_evaluate=a.fraction, min_train_nodes=1, min_evaluate_nodes=1,
            min_available_nodes=a.clients,
        )  # fmt: skip
        initial = ArrayRecord([np.zeros(a.dim, np.float32)])
        strategy.start(
            grid, initial, a.rounds, evaluate_fn=lambda rnd, arrays: marks.append(time.perf_counter())
        )

    from flwr.simulation import run_simulation

    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False, "logging_level": "error"},
    }
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=a.clients, backend_config=backend
    )
    print(
        json.dumps({"round_seconds": [b - a_ for a_, b in zip(marks, marks[1:], strict=False)]}), flush=True
    )


if __name__ == "__main__":
    main()
