"""The work behind each message, shared by every way a client runs: a simulated client calls it in its Ray
actor, a device in its resident worker (fedpeft.device.worker) that the ClientApp forwards to. Records in,
records out; the base is loaded once per process (fedpeft.device.runtime.get_device).

Tasks: "describe" (fingerprint, name, optionally the adapter schema and initial state), "train" (a plain
round's delta), "update" (secure stage 3: the flat delta the ClientApp masks), "evaluate" (held-out loss,
and personalization after the last round). Personal adapters stay in the store: replies carry the shared
keys' delta and scalar metrics only.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NamedTuple

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.config.files import from_run_config
from fedpeft.config.node import DeviceConfig
from fedpeft.config.tree import RunConfig
from fedpeft.config.validate import validate
from fedpeft.errors import FedpeftError
from fedpeft.federation.wire import arrays_to_record, record_to_arrays
from fedpeft.model.adapter_files import names_base
from fedpeft.model.placement import gpu_figures
from fedpeft.privacy.central import clip
from fedpeft.processes import cgroup_peak, peak_rss, pss, tree_peak_rss, tree_pss
from fedpeft.secagg.records import flatten

if TYPE_CHECKING:
    from fedpeft.device.runtime import Device

# set by the device worker: its device's process tree (`fedpeft client`), base loads before this worker,
# and its PSS sampler (fedpeft.processes.PeakPss)
STATS: dict[str, Any] = {"root_pid": 0, "loads_before": 0, "pss": None, "budget_logged": None}
log = logging.getLogger("fedpeft")
# (partition, round, client) -> the FitResult a lockstep group computed for that message (prefit), taken by
# the message's own task when it runs right after (fedpeft.simulation.lockstep)
PREFIT: dict[tuple[int, int, int], Any] = {}


def config_for(content: RecordDict, node: DeviceConfig | None) -> RunConfig:
    cfg = from_run_config(dict(content["config"]))
    if node is not None:  # a real device: its own copy of the base and its own cache
        base = replace(
            cfg.base, model=node.model or cfg.base.model, cache_dir=node.cache_dir or cfg.base.cache_dir
        )
        # the server's path means nothing here: a device keeps its personal adapters in its own store
        cfg = replace(cfg, base=base, personal=replace(cfg.personal, store=node.personal_dir))
        # a device computes where its owner runs it (CPU): the server's --device is not its to choose
        cfg = replace(cfg, base=replace(cfg.base, device="cpu"))
        if node.rank:  # its own slice of the federation's rank (fedpeft.federation.ranks)
            if node.rank > cfg.adapter.rank:
                raise FedpeftError(
                    f"refused: --rank {node.rank} exceeds the federation's LoRA rank {cfg.adapter.rank}"
                )
            cfg = validate(replace(cfg, federation=replace(cfg.federation, client_ranks=(node.rank,))))
        if node.quant:  # its own quantization of the federation's base (fedpeft.model.fingerprint)
            if node.quant != cfg.base.quant and cfg.federation.lora_mode == "sb":
                raise FedpeftError(
                    "refused: --lora-mode sb derives its frozen basis from the base's weights, so every device "
                    f"must store them as the federation does (--quant {cfg.base.quant}); drop --quant"
                )
            cfg = replace(cfg, base=replace(cfg.base, quant=node.quant))
        if node.compute_dtype:  # the device's own choice of compute precision (fedpeft.model.precision)
            cfg = replace(cfg, base=replace(cfg.base, compute_dtype=node.compute_dtype))
        # the device's own budget, else the federation's, for the device as a whole: micro-batches that
        # fit what its other processes leave, same effective batch
        if budget := node.max_memory or cfg.train.max_memory:
            cfg = replace(cfg, train=replace(cfg.train, max_memory=training_budget(budget)))
    return cfg


def training_budget(device_mib: float) -> float:
    """What --max-memory leaves this process: the device's whole budget is its process tree's PSS (what
    the device really holds, shared pages once), so what its other processes hold now (the SuperNode and
    `fedpeft client`) comes off. This process's own estimate is of its RSS, which its PSS never exceeds."""
    root = STATS["root_pid"]
    others = tree_pss(root) - pss() if root else 0
    left = device_mib - others / 2**20
    logged = STATS["budget_logged"]
    if logged is None or logged[0] != device_mib or abs(logged[1] - left) > 32:  # said again when it moves
        STATS["budget_logged"] = (device_mib, round(left))
        log.info(
            "--max-memory %.0f MiB for this device: its SuperNode and supervisor hold %.0f MiB (PSS), "
            "%.0f MiB is the worker's",
            device_mib,
            others / 2**20,
            left,
        )
    return max(left, 1.0)


class Setup(NamedTuple):
    device: Device
    local: int  # this process's data index
    client: int  # the client's index in the federation
    load_seconds: float  # spent loading the base for this message (0 when the process already held it)


def setup(content: RecordDict, node: DeviceConfig | None, partition: int) -> Setup:
    start = time.perf_counter()
    from fedpeft.device.runtime import get_device  # torch: only the tasks that need the base load it

    cfg = config_for(content, node)
    task = content["task"]
    if node is not None:
        device, local = get_device(cfg, data_path=node.data_path, name=node.name), 0
    else:
        quants = cfg.federation.client_quants
        if quants:  # this client's quantization of the base (--client-quants, by turns)
            which = quants[int(task.get("client", partition)) % len(quants)]
            cfg = replace(cfg, base=replace(cfg.base, quant=which))
        device, local = get_device(cfg), partition
    client = int(task.get("client", local))
    load_seconds = time.perf_counter() - start
    check_base(task, device.fingerprint, device.source)
    return Setup(device, local, client, load_seconds)


def check_base(task: ConfigRecord, mine: str, source: str = "") -> None:
    """Refuse before training: an update computed on another base would be meaningless to the federation.
    The federation names either the source weights (any quantization of them joins) or, pinned, the exact
    quantized base (fedpeft.model.fingerprint)."""
    expected = task.get("fingerprint")
    if expected and not names_base(str(expected), mine, source):
        raise FedpeftError(
            f"refused: this device's base (fingerprint {mine[:16]}, of the weights {(source or mine)[:16]}) "
            f"differs from the federation's ({str(expected)[:16]}); use the same model "
            "file as the server (and its --quant where the federation pins one)"
        )


def info(device: Device, local: int, client: int) -> ConfigRecord:
    clients = device.clients
    return ConfigRecord(
        {
            "fingerprint": device.fingerprint,
            # the weights it was quantized from, and how: a federation may mix quantizations of one base
            "source": device.source,
            "quant": device.base.quant,
            "client": client,
            "name": clients.users[local],
            # under DP every client weighs the same, and its amount of text is not sent
            "num-examples": 1 if device.cfg.privacy.mode != "off" else clients.tokens(local),
            # a LoRA rank below the federation's: a secure round caps its clients' ranks on it
            **({"rank": device.slice.of(client)} if device.slice.of(client) < device.slice.full else {}),
            # what this device computes in and why, for round 0 of metrics.jsonl (fedpeft.model.precision)
            **{f"compute-{k}": v for k, v in device.base.precision.metrics().items()},
        }
    )


def device_stats(device: str = "cpu") -> dict[str, float]:
    """How often this device has loaded its base since it started; its processes' memory: the sum of
    their peak RSS (an upper bound that counts shared pages once per process), on a device the highest
    PSS of its process tree (sampled) and its cgroup's peak where it runs in a cgroup v2 of its own;
    and on a GPU the peak GPU memory its process allocated."""
    from fedpeft.device.runtime import BASE_LOADS  # torch: off the ClientApp's start-up path

    root = STATS["root_pid"]
    # a device worker's tree (it may have restarted); a simulated client's actor starts no process, and
    # scanning the process table for its children was a noticeable part of the actor's time at 1,000
    # clients (benchmarks/README.md, "Federation scale")
    rss = tree_peak_rss(root) if root else peak_rss()
    out = {"base_loads": float(STATS["loads_before"] + BASE_LOADS[0]), "peak_rss_mib": round(rss / 2**20, 1)}
    if STATS["pss"] is not None:
        out["peak_pss_mib"] = round(STATS["pss"].sample() / 2**20, 1)
        if (cgroup := cgroup_peak()) is not None:
            out["cgroup_peak_mib"] = round(cgroup / 2**20, 1)
    return {**out, **gpu_figures(device)}


def describe(content: RecordDict, node: DeviceConfig | None, partition: int) -> RecordDict:
    device, local, client, _ = setup(content, node, partition)
    record = info(device, local, client)
    if node is not None:
        del record["client"]  # a device has no index until the server assigns one
    out = RecordDict({"info": record})
    if content["task"].get("with-init", False):
        out["description"] = ConfigRecord({"json": json.dumps(device.describe().to_json())})
        out["init"] = arrays_to_record(device.init_state)
    return out


def _fit(content: RecordDict, node: DeviceConfig | None, partition: int):
    from fedpeft.model.memory import BudgetTooSmall  # torch: training needs it anyway

    device, local, client, load_seconds = setup(content, node, partition)
    rnd = int(content["task"]["round"])
    try:
        result = PREFIT.pop((local, rnd, client), None)
        if result is None:
            # a secure round may cap the rank its clients train (fedpeft.federation.ranks.round_cap)
            cap = int(content["task"].get("rank-cap", 0))
            result = device.fit(local, record_to_arrays(content["arrays"]), rnd, client, cap)
    except BudgetTooSmall as e:
        if node is None or not STATS["budget_logged"]:
            raise
        # said in the device's terms: its budget covers its SuperNode and supervisor too
        whole, left = STATS["budget_logged"]
        raise FedpeftError(
            f"--max-memory {whole:g} MiB is too small for this device: its SuperNode and supervisor hold "
            f"{whole - left:.0f} MiB and training needs at least {e.need_mib} MiB; the smallest budget that "
            f"works is about {math.ceil(whole - left + e.need_mib)} MiB"
        ) from None
    dp: dict[str, float] = {}
    if device.cfg.privacy.mode != "off":  # DP-FedAvg: the whole delta clipped, every client weighs the same
        delta, clipped = clip(result.delta, device.cfg.privacy.clip)
        result, dp = replace(result, delta=delta, num_examples=1), {"dp_clipped": float(clipped)}
    metrics = {
        **dp,
        "num-examples": float(result.num_examples),
        "train_loss": result.train_loss,
        "train_seconds": result.seconds,
        "load_seconds": load_seconds,
        "personal_seconds": result.personal_seconds,
        "lockstep_clients": float(result.group),
        # a secure sum carries each rank slice's weight in `rank_slots` entries (fedpeft.federation.ranks);
        # DP weighs every client the same and does not mix ranks
        **(
            {"rank": float(result.rank), "rank_slots": float(device.slice.full)}
            if result.rank and device.cfg.privacy.mode == "off"
            else {}
        ),
        **device_stats(device.base.device),
    }
    return device, local, client, result, metrics


def prefit(contents: list[tuple[RecordDict, int]]) -> None:
    """Train the clients of several simulated training messages ((content, partition) each) at once
    (Device.fit_many), each result kept in PREFIT for its message's own task. Simulation only: a device
    trains its one user."""
    PREFIT.clear()
    jobs, keys = [], []
    for content, partition in contents:
        device, local, client, _ = setup(content, None, partition)
        rnd = int(content["task"]["round"])
        jobs.append((local, record_to_arrays(content["arrays"]), rnd, client))
        keys.append((local, rnd, client))
    for key, result in zip(keys, device.fit_many(jobs), strict=True):
        PREFIT[key] = result


def train(content: RecordDict, node: DeviceConfig | None, partition: int) -> RecordDict:
    device, local, client, result, metrics = _fit(content, node, partition)
    return RecordDict(
        {
            "delta": arrays_to_record(result.delta),
            "metrics": MetricRecord(metrics),
            "info": info(device, local, client),
        }
    )


def update(content: RecordDict, node: DeviceConfig | None, partition: int) -> RecordDict:
    """Secure stage 3's local training: the delta flattened in the travel keys' order, and its weight."""
    device, local, client, result, metrics = _fit(content, node, partition)
    flat = flatten(result.delta, device.keys)
    return RecordDict(
        {
            "update": ArrayRecord({"flat": Array(flat)}),
            "metrics": MetricRecord(metrics),
            "info": info(device, local, client),
        }
    )


def evaluate(content: RecordDict, node: DeviceConfig | None, partition: int) -> RecordDict:
    device, local, client, _ = setup(content, node, partition)
    task = content["task"]
    arrays = record_to_arrays(content["arrays"])
    out = RecordDict({"info": info(device, local, client)})
    if task.get("personal", False) and device.strategy.personal:
        others = bool(task.get("specificity", False))
        result = device.personalize(local, arrays, int(task["round"]), client, others)
        loss, tokens = result.pop("eval_loss"), result.pop("eval_tokens")
        out["personal"] = ConfigRecord(result)  # scalars and short strings: nothing of the adapter
    else:
        loss, tokens = device.evaluate(local, arrays, bare=int(task["round"]) == 0)
    metrics = {"eval_loss": loss, "eval_tokens": tokens}
    # task data: the global adapter's (round 0: the base's zero-shot) task scores (fedpeft.federation.task_eval)
    metrics.update(device.task_scores(local, arrays, bare=int(task["round"]) == 0))
    if task.get("reference", False):  # the forgetting guard's yardstick: general text, nobody's data
        metrics.update(device.reference_losses(int(task["round"]), arrays))
    if task.get("with_base", False):  # a sampled round: the base on the same text, for its comparison
        metrics["base_loss"] = device.base_loss(local, arrays)
    if task.get("full_base", False):  # round 0 and the last round: the same on the unquantized base
        full = device.evaluate_full(local, arrays, bare=int(task["round"]) == 0)
        if full is not None:
            metrics["full_eval_loss"] = full
            if task.get("with_base", False):
                full_base = device.full_base_loss(local, arrays)
                if full_base is not None:
                    metrics["full_base_loss"] = full_base
        if node is not None and int(task["round"]) > 0:  # a device's last round: nothing more needs it
            device.drop_full_base()
    out["metrics"] = MetricRecord(metrics)
    return out


TASKS = {"describe": describe, "train": train, "update": update, "evaluate": evaluate}


def run(kind: str, content: RecordDict, node: DeviceConfig | None, partition: int = 0) -> RecordDict:
    return TASKS[kind](content, node, partition)
