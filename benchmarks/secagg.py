"""Secure aggregation benchmark: plain sum vs fedpeft's SecAgg+ vs Flower's SecAggPlusWorkflow, one run.

Each setting runs as a real Flower simulation (Ray) with N virtual clients that each hold a random
vector of D float32 in [-0.01, 0.01] (a client's adapter delta), k neighbours and threshold t the same
for both secure variants. Reported per (N, D) and variant: server round time, bytes each client
uploads (measured on the reply messages by a client mod), and the max abs error of the recovered
mean vs the exact float64 mean.

    python benchmarks/secagg.py                          # (10, 1M) (100, 100k) (100, 1M) (200, 100k)
    python benchmarks/secagg.py --settings 10x100000     # one quick setting
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

CLIP = 0.01
ROUNDS = 2  # every variant runs two rounds; the first also starts Ray's actors, so the second is timed
RESULT: dict = {}


def client_vector(pid: int, dim: int) -> np.ndarray:
    return np.random.default_rng([pid, 17]).uniform(-CLIP, CLIP, size=dim).astype(np.float32)


def measure_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201
    """Add the bytes of every reply (arrays, bytes and strings in config records) to a per-client log."""
    reply = call_next(msg, context)
    size = 0
    if reply.has_content():
        for record in reply.content.values():
            if isinstance(record, ArrayRecord):
                size += sum(len(a.data) for a in record.values())
            elif isinstance(record, ConfigRecord):
                for v in record.values():
                    items = v if isinstance(v, list) else [v]
                    size += sum(len(x) if isinstance(x, (bytes, str)) else 8 for x in items)
    with open(Path(os.environ["FEDPEFT_BENCH_DIR"]) / f"{os.getpid()}.txt", "a") as f:
        f.write(f"{context.node_config['partition-id']} {size}\n")
    return reply


def wait_for_nodes(grid: Grid) -> list[int]:
    for _ in range(600):
        nodes = sorted(grid.get_node_ids())
        if nodes:
            return nodes
        time.sleep(0.1)
    raise RuntimeError("no nodes")


# --- plain ------------------------------------------------------------------------------------------

plain_client = ClientApp(mods=[measure_mod])


@plain_client.train()
def plain_train(msg: Message, context: Context) -> Message:
    vec = client_vector(int(context.node_config["partition-id"]), int(msg.content["task"]["dim"]))
    return Message(RecordDict({"vec": ArrayRecord({"v": Array(vec)})}), reply_to=msg)


def plain_server(dim: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid)
        for _ in range(2):  # the first round also starts Ray's actors: time the second
            start = time.perf_counter()
            replies = grid.send_and_receive(
                [
                    Message(
                        RecordDict({"task": ConfigRecord({"dim": dim})}),
                        dst_node_id=n,
                        message_type=MessageType.TRAIN,
                    )
                    for n in nodes
                ]
            )
            total = np.zeros(dim)
            for r in replies:
                total += r.content["vec"]["v"].numpy()
            RESULT.update(seconds=time.perf_counter() - start, mean=total / len(nodes))

    return app


# --- fedpeft SecAgg+ --------------------------------------------------------------------------------

ours_client = ClientApp(mods=[measure_mod])


@ours_client.train()
def ours_train(msg: Message, context: Context) -> Message:
    from fedpeft.secagg.client_stages import handle

    pid = int(context.node_config["partition-id"])
    dim = int(msg.content["task"]["dim"])
    reply = handle(
        dict(msg.content["task"]),
        msg.content,
        context.state,
        pid,
        lambda: (client_vector(pid, dim).astype(np.float64), 1.0, {}),
    )
    return Message(reply, reply_to=msg)


def ours_server(dim: int, k: int, t: int) -> ServerApp:
    from fedpeft.secagg.quantize import RingCode
    from fedpeft.secagg.server_stages import SecAggParams, secure_sum

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = wait_for_nodes(grid)

        def send(payloads: dict[int, dict]) -> dict[int, Message]:
            messages = []
            for c, p in payloads.items():
                content = RecordDict({"task": ConfigRecord({**p["task"], "dim": dim})})
                for key, rec in p.items():
                    if key != "task":
                        content[key] = rec
                messages.append(Message(content, dst_node_id=nodes[c], message_type=MessageType.TRAIN))
            replies = list(grid.send_and_receive(messages))
            return {nodes.index(r.metadata.src_node_id): r for r in replies}

        code = RingCode(clip=CLIP, max_clients=len(nodes), max_weight=1.0)
        for rnd in range(2):  # the first round also starts Ray's actors: time the second
            start = time.perf_counter()
            total, _, _ = secure_sum(
                send, list(range(len(nodes))), dim + 1, code, SecAggParams(k, t), b"r%d" % rnd, rnd
            )
            weighted, weight = code.decode_sum(total)
            RESULT.update(seconds=time.perf_counter() - start, mean=weighted / weight)

    return app


# --- Flower's SecAggPlusWorkflow (legacy strategy API) ---------------------------------------------------


def flower_apps(dim: int, n: int, k: int, t: int) -> tuple[ServerApp, ClientApp]:
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class VectorClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):  # noqa: ANN001, ANN201
            return [client_vector(self.pid, dim)], 1, {}

    client = ClientApp(
        client_fn=lambda ctx: VectorClient(int(ctx.node_config["partition-id"])).to_client(),
        mods=[measure_mod, secaggplus_mod],
    )
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([np.zeros(dim, np.float32)]),
        )
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=2), strategy=strategy)
        # num_shares counts the client itself, like our k + 1 holders; same clipping range as ours
        secagg = SecAggPlusWorkflow(
            num_shares=k + 1, reconstruction_threshold=t, clipping_range=CLIP, max_weight=1.0
        )
        seconds: list[float] = []

        def timed_fit(grid: Grid, context: Context) -> None:
            start = time.perf_counter()
            secagg(grid, context)
            seconds.append(time.perf_counter() - start)

        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)
        record = legacy.state.array_records["parameters"]  # where DefaultWorkflow keeps the global model
        # 2 rounds of FedAvg from zeros: each round's result is the mean (the params are not used by clients)
        RESULT.update(seconds=seconds[-1], mean=record.to_numpy_ndarrays()[0])

    return server, client


# --- driver ---------------------------------------------------------------------------------------------


def run_variant(variant: str, n: int, dim: int, k: int, t: int, work: Path) -> dict:
    from flwr.simulation import run_simulation

    RESULT.clear()
    logs = Path(os.environ["FEDPEFT_BENCH_DIR"])
    for old in logs.glob("*.txt"):
        old.unlink()
    if variant == "plain":
        server, client = plain_server(dim), plain_client
    elif variant == "fedpeft":
        server, client = ours_server(dim, k, t), ours_client
    else:
        server, client = flower_apps(dim, n, k, t)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count(),
            "num_gpus": 0,
            "include_dashboard": False,
            "_temp_dir": str(work / "ray"),
            "logging_level": "error",
            "log_to_driver": False,
        },
    }
    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend)
    if "seconds" not in RESULT:
        raise SystemExit(f"{variant} at N={n} D={dim} produced no result")
    exact = np.mean([client_vector(i, dim).astype(np.float64) for i in range(n)], axis=0)
    per_client: dict[str, int] = {}
    for log in logs.glob("*.txt"):
        for line in log.read_text().split("\n"):
            if line:
                pid, size = line.split()
                per_client[pid] = per_client.get(pid, 0) + int(size)
    return {
        "variant": variant,
        "n": n,
        "dim": dim,
        "k": k,
        "t": t,
        "seconds": RESULT["seconds"],
        "bytes_up_per_client": float(np.mean(list(per_client.values()))) / ROUNDS,
        "max_abs_error": float(np.max(np.abs(np.asarray(RESULT["mean"], dtype=np.float64) - exact))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="10x1000000,100x100000,100x1000000,200x100000", help="NxD,...")
    p.add_argument("--k", type=int, default=10, help="neighbours per client (Flower: num_shares = k + 1)")
    p.add_argument("--variants", default="plain,fedpeft,flower")
    p.add_argument("--json", default="benchmarks/results/secagg.json")
    a = p.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    from fedpeft.secagg.protocol import default_threshold

    work = Path(tempfile.mkdtemp(prefix="fb-"))
    os.environ["FEDPEFT_BENCH_DIR"] = str(work / "bytes")  # inherited by Ray's workers
    (work / "bytes").mkdir()
    rows = []
    try:
        for setting in a.settings.split(","):
            n, dim = (int(v) for v in setting.split("x"))
            k = min(a.k, n - 1)
            t = default_threshold(k, n)
            for variant in a.variants.split(","):
                r = run_variant(variant, n, dim, k, t, work)
                rows.append(r)
                print(f"  {variant} N={n} D={dim}: {r['seconds']:.2f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\n## Secure aggregation, one round (k = {a.k} neighbours, t = t_min of k + 1 holders, 2 CPU cores)\n"
    )
    print(
        "| N | D | variant | round (s) | vs plain | bytes up / client | bytes / param | max abs error of mean |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        plain = next(x for x in rows if x["n"] == r["n"] and x["dim"] == r["dim"] and x["variant"] == "plain")
        print(
            f"| {r['n']} | {r['dim']:,} | {r['variant']} | {r['seconds']:.2f} | {r['seconds'] / plain['seconds']:.2f}x | "
            f"{r['bytes_up_per_client']:,.0f} | {r['bytes_up_per_client'] / r['dim']:.2f} | {r['max_abs_error']:.1e} |"
        )
    for n, dim in {(r["n"], r["dim"]) for r in rows}:
        by = {r["variant"]: r for r in rows if r["n"] == n and r["dim"] == dim}
        if "fedpeft" in by and "flower" in by:
            print(
                f"\nN={n}, D={dim:,}: fedpeft is {by['flower']['seconds'] / by['fedpeft']['seconds']:.1f}x faster "
                f"than Flower's SecAggPlusWorkflow"
            )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
