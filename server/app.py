"""Flower ServerApp: the round loop moves messages; fedpeft.federation decides everything.

Round 0 asks every node to describe itself (base fingerprint, client id; one node also sends the
adapter schema, its seeded initial adapter and PEFT config). Each round then: sample clients, send
the global adapter, check and aggregate the replies, evaluate the new global adapter on every
client's held-out text, checkpoint, write metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from client.records import arrays_to_record, record_to_arrays
from fedpeft.adapter_files import AdapterDescription
from fedpeft.aggregate import Arrays
from fedpeft.config import FederationConfig, RunConfig, client_lr
from fedpeft.config_io import from_run_config, to_run_config
from fedpeft.errors import FedpeftError
from fedpeft.federation import (
    ServerState,
    aggregate_round,
    apply_mean,
    check_update,
    checkpoint_path,
    initial_state,
    load_checkpoint,
    sample_clients,
    save_checkpoint,
    write_global,
    write_metrics,
)

log = logging.getLogger("fedpeft")


@dataclass
class Roster:
    """What registration learned of each client (by client index)."""

    node_of: dict[int, int] = field(default_factory=dict)  # Flower node id
    names: dict[int, str] = field(default_factory=dict)
    fingerprints: dict[int, str] = field(default_factory=dict)
    examples: dict[int, float] = field(default_factory=dict)  # training tokens: the FedAvg weight
    fingerprint: str = ""  # the federation's base

    def sample(self, f: FederationConfig, rnd: int) -> list[int]:
        """This round's clients; indices into the registered clients (some devices may have failed)."""
        ids = sorted(self.node_of)
        return [ids[i] for i in sample_clients(len(ids), f.fraction, f.min_clients, f.seed, rnd)]

    def on_base(self) -> list[int]:
        """Clients whose base is the federation's (the others are refused, and refuse, every round)."""
        return [c for c in sorted(self.node_of) if self.fingerprints[c] == self.fingerprint]


@dataclass
class Outcome:
    """What the loop hands back to `fedpeft simulate` (Flower's runner swallows exceptions)."""

    state: ServerState | None = None
    error: str | None = None


def _message(
    cfg_record: ConfigRecord, node: int, kind: str, task: dict[str, Any], arrays: dict | None = None
) -> Message:
    """Every task after registration names its client index and the federation's base fingerprint: a
    device learns its index from it and refuses to train on another base."""
    content = RecordDict({"config": cfg_record, "task": ConfigRecord(task)})
    if arrays is not None:
        content["arrays"] = arrays_to_record(arrays)
    return Message(content, dst_node_id=node, message_type=kind)


def _exchange(grid: Grid, messages: dict[int, Message]) -> dict[int, Message]:
    """Send, wait, and key each reply as its message was keyed. A reply is matched by the message it
    answers, not by its sender: an error reply the SuperLink makes for a node that stopped sending
    heartbeats (a device gone mid-round) comes from the SuperLink's own node id."""
    order = list(messages.items())
    replies = grid.send_and_receive([m for _, m in order])
    key_of = {m.metadata.message_id: k for k, m in order}
    return {
        key_of[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in key_of
    }


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def _error_text(reply: Message) -> str:
    return reply.error.reason.strip().splitlines()[-1][:300] if reply.has_error() else ""


def _register(
    grid: Grid, cfg: RunConfig, cfg_record: ConfigRecord, pinned: str = ""
) -> tuple[Roster, AdapterDescription, Arrays]:
    """Ask every node who it is, give each a client index, pick the federation's base, and have one client
    on that base describe the adapter. Returns the roster, the adapter description, the initial arrays.

    Simulated clients report their partition index; real devices report a name and are indexed in name
    order (so a deployment of the same users as a simulation gets the same indices, hence seeds)."""
    want = cfg.federation.clients
    nodes = _wait_for_nodes(grid, want, timeout=cfg.federation.connect_timeout)
    if len(nodes) < max(cfg.federation.min_clients, 1):
        raise FedpeftError(
            f"only {len(nodes)} of {want} clients connected within {cfg.federation.connect_timeout:.0f} s"
        )
    if len(nodes) < want:
        log.warning("%d of %d clients connected; going on without the others", len(nodes), want)
    answers = _exchange(grid, {node: _message(cfg_record, node, MessageType.QUERY, {}) for node in nodes})
    replies = [answers[n] for n in nodes if n in answers]
    node_of_reply = {id(answers[n]): n for n in answers}
    good = []
    for reply in replies:
        if reply.has_error():
            log.warning("a client failed to start and is left out: %s", _error_text(reply))
        else:
            good.append(reply)
    if len(good) < len(replies) and all("client" in r.content["info"] for r in good):
        # simulated clients share one data set: a failure there is the run's, not one device's
        raise FedpeftError(
            f"a client failed to start: {_error_text(next(r for r in replies if r.has_error()))}"
        )
    if len(good) < cfg.federation.min_clients:
        raise FedpeftError(f"only {len(good)} clients started; --min-clients is {cfg.federation.min_clients}")

    def key(r: Message) -> tuple:
        info = r.content["info"]
        return (int(info["client"]) if "client" in info else -1, str(info["name"]), node_of_reply[id(r)])

    good.sort(key=key)
    if len(good) > want:
        log.warning("%d clients connected; the federation takes the first %d by name", len(good), want)
        good = good[:want]
    roster = Roster()
    for index, reply in enumerate(good):
        info = reply.content["info"]
        client = int(info["client"]) if "client" in info else index
        roster.node_of[client], roster.names[client] = node_of_reply[id(reply)], str(info["name"])
        roster.fingerprints[client] = str(info["fingerprint"])
        roster.examples[client] = float(info["num-examples"])
    if len(set(roster.names.values())) < len(roster.names):
        log.warning("two clients report the same name; they are told apart by node id")
    counts: dict[str, int] = {}
    for c in sorted(roster.node_of):  # most common base; ties go to the lowest client index
        counts[roster.fingerprints[c]] = counts.get(roster.fingerprints[c], 0) + 1
    roster.fingerprint = pinned or max(counts, key=lambda fp: counts[fp])
    members = roster.on_base()
    odd = [roster.names[c] for c in sorted(roster.node_of) if c not in members]
    if odd:
        log.warning(
            "clients on another base than the federation's (%s...); they are refused every round: %s",
            roster.fingerprint[:16],
            ", ".join(odd),
        )
    if not members:
        raise FedpeftError(f"no client holds the federation's base {roster.fingerprint[:16]}...")
    describer = members[0]
    (reply,) = grid.send_and_receive(
        [
            _message(
                cfg_record,
                roster.node_of[describer],
                MessageType.QUERY,
                {"with-init": True, "client": describer, "fingerprint": roster.fingerprint},
            )
        ]
    )
    if reply.has_error():
        raise FedpeftError(
            f"client {roster.names[describer]} failed to describe the adapter: {_error_text(reply)}"
        )
    description = AdapterDescription.from_json(json.loads(reply.content["description"]["json"]))
    init = record_to_arrays(reply.content["init"])
    return roster, description, init


def _task(roster: Roster, client: int, **task: Any) -> dict[str, Any]:
    return {**task, "client": client, "fingerprint": roster.fingerprint}


def _evaluate(
    grid: Grid, cfg_record: ConfigRecord, state: ServerState, roster: Roster, personal: bool = False
) -> dict[str, Any]:
    """The global adapter on every client's held-out text; with `personal`, each client also evaluates its
    personal adapter and reports which of the two it keeps (scalars only)."""
    node_of, names = roster.node_of, roster.names
    arrays = state.travel_arrays()
    members = roster.on_base()
    task = {"round": state.round, **({"personal": True} if personal else {})}
    replies = _exchange(
        grid,
        {
            c: _message(cfg_record, node_of[c], MessageType.EVALUATE, _task(roster, c, **task), arrays)
            for c in members
        },
    )
    per_client, nll, tokens = {}, 0.0, 0
    for c, reply in sorted(replies.items()):
        if reply.has_error():
            log.warning("evaluation failed on %s: %s", names[c], _error_text(reply))
            continue
        m = reply.content["metrics"]
        loss, n = float(m["eval_loss"]), int(m["eval_tokens"])
        entry: dict[str, Any] = {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": n}
        if "personal" in reply.content:
            try:
                entry.update(_personal_entry(reply.content["personal"], entry["ppl"]))
            except (KeyError, TypeError, ValueError) as e:  # a device's bad report must not stop the run
                log.warning("ignored a malformed personal report from %s: %r", names[c], e)
        per_client[names[int(reply.content["info"]["client"])]] = entry
        nll, tokens = nll + loss * n, tokens + n
    mean = nll / max(tokens, 1)
    return {
        "eval_loss": mean,
        "eval_ppl": math.exp(min(mean, 50)),
        "eval_tokens": tokens,
        "eval_ppl_client_mean": sum(c["ppl"] for c in per_client.values()) / max(len(per_client), 1),
        "eval_per_client": dict(sorted(per_client.items())),
        "bytes_down_eval": sum(a.nbytes for a in arrays.values()) * len(members),
    }


def _personal_entry(record: ConfigRecord, global_ppl: float) -> dict[str, Any]:
    p = dict(record)
    entry: dict[str, Any] = {
        "kept": str(p["kept"]),
        "note": str(p.get("note", "")),
        "personal_seconds": float(p["personal_seconds"]),
    }
    if "personal_eval_loss" in p:
        entry["personal_ppl"] = math.exp(min(float(p["personal_eval_loss"]), 50))
    entry["kept_ppl"] = entry["personal_ppl"] if entry["kept"] == "personal" else global_ppl
    for key in ("val_loss_global", "val_loss_personal"):
        if key in p:
            entry[key] = float(p[key])
    return entry


def _personal_round(cfg: RunConfig, rnd: int) -> bool:
    """fedsa and ditto hold personal adapters from their first sampled round on: evaluate them every
    round; finetune makes its personal adapters at the federation's last round only."""
    method = cfg.personal.method
    return method != "none" and rnd >= 1 and (method != "finetune" or rnd == cfg.federation.rounds)


def _add_base(metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """Each client's base-model perplexity, from round 0: the initial adapter is the identity (LoRA B = 0,
    IA3 vectors = 1; tests/test_personalize.py checks it against the base with the adapter disabled)."""
    from fedpeft.personalize import summarize

    base = history[0]["eval_per_client"] if history else {}
    for user, entry in metrics["eval_per_client"].items():
        if "kept" in entry and user in base:
            entry["base_ppl"] = base[user]["ppl"]
    summary = summarize(metrics["eval_per_client"])
    if summary is not None:
        metrics["personal"] = summary


def _train_round(
    grid: Grid,
    cfg: RunConfig,
    cfg_record: ConfigRecord,
    state: ServerState,
    roster: Roster,
) -> tuple[ServerState, dict[str, Any]]:
    node_of, names = roster.node_of, roster.names
    rnd = state.round + 1
    f = cfg.federation
    sampled = roster.sample(f, rnd)
    arrays = state.travel_arrays()
    replies = _exchange(
        grid,
        {
            c: _message(cfg_record, node_of[c], MessageType.TRAIN, _task(roster, c, round=rnd), arrays)
            for c in sampled
        },
    )
    accepted: dict[int, tuple[dict, float, float, float, float, float]] = {}
    rejected, bytes_up = [], 0
    for client, reply in sorted(replies.items()):
        if reply.has_error():
            rejected.append(
                {"client": names.get(client, str(client)), "reason": f"client error: {_error_text(reply)}"}
            )
            continue
        delta = record_to_arrays(reply.content["delta"])
        bytes_up += sum(a.nbytes for a in delta.values())
        m = reply.content["metrics"]
        reason = check_update(
            delta, str(reply.content["info"]["fingerprint"]), float(m["num-examples"]), state
        )
        if reason:
            rejected.append({"client": names[client], "reason": reason})
            continue
        accepted[client] = (
            delta,
            float(m["num-examples"]),
            float(m["train_loss"]),
            float(m["train_seconds"]),
            float(m.get("load_seconds", 0.0)),
            float(m.get("personal_seconds", 0.0)),
        )
    for r in rejected:
        log.warning("round %d: refused %s: %s", rnd, r["client"], r["reason"])
    order = sorted(accepted)  # sum in client order: the result does not depend on reply arrival order
    metrics: dict[str, Any] = {
        "round": rnd,
        "sampled": [names[c] for c in sampled],
        "accepted": [names[c] for c in order],
        "rejected": rejected,
        "bytes_up": bytes_up,
        "bytes_down": sum(a.nbytes for a in arrays.values()) * len(sampled),
    }
    if len(order) < f.min_clients:
        log.warning(
            "round %d: %d valid replies < min_clients %d; global adapter unchanged",
            rnd,
            len(order),
            f.min_clients,
        )
        metrics.update(skipped=True, train_loss=None)
        return ServerState(rnd, state.arrays, state.opt_state, state.info, state.history), metrics
    weights = [accepted[c][1] for c in order]
    new = aggregate_round(state, [accepted[c][0] for c in order], weights, cfg)
    metrics.update(
        skipped=False,
        train_loss=sum(accepted[c][2] * w for c, w in zip(order, weights, strict=True)) / sum(weights),
        train_seconds_max=max(accepted[c][3] for c in order),
        train_seconds_sum=sum(accepted[c][3] for c in order),
        client_seconds={
            names[c]: {"load": accepted[c][4], "train": accepted[c][3], "personal": accepted[c][5]}
            for c in order
        },
    )
    return new, metrics


def _secure_train_round(
    grid: Grid,
    cfg: RunConfig,
    cfg_record: ConfigRecord,
    state: ServerState,
    roster: Roster,
) -> tuple[ServerState, dict[str, Any]]:
    """One round under SecAgg+: the server sees masked vectors and recovers only their sum."""
    node_of, names = roster.node_of, roster.names
    from fedpeft.secagg.flower import SecAggParams, secure_sum, unflatten
    from fedpeft.secagg.protocol import SecAggAbort
    from fedpeft.secagg.quantize import RingCode

    rnd, f = state.round + 1, cfg.federation
    sampled = roster.sample(f, rnd)
    rejected: list[dict[str, str]] = []
    members = sampled  # a client on another base refuses at stage 1 and drops out there
    arrays = state.travel_arrays()
    lr = client_lr(cfg)
    # clip at twice what AdamW can move a coordinate in the local steps (fedpeft/secagg/quantize.py)
    code = RingCode(
        clip=2 * lr * f.local_steps,
        max_clients=max(len(members), 1),
        max_weight=max(roster.examples[c] for c in members),
    )
    dim = sum(a.size for a in arrays.values()) + 1

    def send(payloads: dict[int, dict[str, Any]]) -> dict[int, Message]:
        messages = {}
        for c, p in payloads.items():
            stage3 = p["task"]["secagg-stage"] == 3
            m = _message(
                cfg_record,
                node_of[c],
                MessageType.TRAIN,
                _task(roster, c, **p["task"], round=rnd),
                arrays if stage3 else None,
            )
            for key, record in p.items():
                if key != "task":
                    m.content[key] = record
            messages[c] = m
        return _exchange(grid, messages)

    metrics: dict[str, Any] = {
        "round": rnd,
        "sampled": [names[c] for c in sampled],
        "rejected": rejected,
        "bytes_down": sum(a.nbytes for a in arrays.values()) * len(sampled),
        "secagg": True,
    }
    tag = f"{state.info.fingerprint[:16]}|seed-{f.seed}|round-{rnd}".encode()
    report: dict[str, Any] = {}  # filled by secure_sum, read also when it aborts
    try:
        if len(members) < f.min_clients:
            raise SecAggAbort(
                f"{len(members)} clients on the federation's base < min_clients {f.min_clients}"
            )
        total, survivors, report = secure_sum(
            send,
            members,
            dim,
            code,
            SecAggParams(f.secagg_k, f.secagg_threshold or None),
            tag,
            seed=f.seed + rnd,
            report=report,
        )
        if len(survivors) < f.min_clients:
            raise SecAggAbort(f"{len(survivors)} survivors < min_clients {f.min_clients}")
    except SecAggAbort as e:
        log.warning("round %d: secure aggregation aborted (%s); global adapter unchanged", rnd, e)
        # who dropped or refused, and why (a device's refusal says which of its limits the round broke)
        rejected.extend(_secagg_rejections(report, [], names))
        for r in rejected:
            log.warning("round %d: %s: %s", rnd, r["client"], r["reason"])
        metrics.update(skipped=True, train_loss=None, accepted=[], bytes_up=0, abort=str(e))
        return ServerState(rnd, state.arrays, state.opt_state, state.info, state.history), metrics
    rejected.extend(_secagg_rejections(report, survivors, names))
    metrics["left_before_unmask"] = [names[c] for c in survivors if c in report["dropped"]]
    weighted, weight = code.decode_sum(total)
    new = apply_mean(state, unflatten(weighted / weight, state.info.schema, state.travel_keys), cfg)
    train = report["train_metrics"]
    # metrics only (the weights travel masked): a client's malformed count must not stop the round
    examples = {c: max(float(train[c].get("num-examples", 1.0)), 1e-12) for c in survivors}
    metrics.update(
        skipped=False,
        accepted=[names[c] for c in survivors],
        secagg_k=report["k"],
        secagg_t=report["t"],
        bytes_up=4 * dim * len(survivors) + report["bytes_up_keys"],
        train_loss=sum(float(train[c].get("train_loss", 0.0)) * examples[c] for c in survivors)
        / sum(examples.values()),
        train_seconds_max=max(float(train[c].get("train_seconds", 0.0)) for c in survivors),
        train_seconds_sum=sum(float(train[c].get("train_seconds", 0.0)) for c in survivors),
        # where a device's time goes: loading the base, training, encoding + masking (stage 3)
        client_seconds={
            names[c]: {
                k: float(train[c].get(f"{k}_seconds", 0.0)) for k in ("load", "train", "mask", "personal")
            }
            for c in survivors
        },
    )
    return new, metrics


def _secagg_rejections(report: dict[str, Any], survivors: list[int], names: dict[int, str]) -> list[dict]:
    """Metrics entries for the clients whose input is not in the sum: dropped (with their own error reply,
    a refusal included) or excluded. A client gone after stage 3 already sent its input: it still counts."""
    out = []
    for c, reason in {**report.get("dropped", {}), **report.get("excluded", {})}.items():
        if c not in survivors:
            out.append(
                {"client": names[c], "reason": f"dropped at {reason}" if "stage" in reason else reason}
            )
    return out


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path, resume: int | None = None) -> ServerState:
    """The whole federation, or its continuation from the checkpoint of round `resume` (which the entry
    point verified before writing anything); returns the final state. Raises FedpeftError on
    unrecoverable input."""
    from tqdm.auto import tqdm

    cfg_record = ConfigRecord(to_run_config(cfg))
    checkpoint = checkpoint_path(run_dir, resume) if resume is not None else None
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    pinned = state.info.fingerprint if state is not None else cfg.federation.base_fingerprint
    roster, description, init = _register(grid, cfg, cfg_record, pinned)
    if cfg.adapter.kind == "lora":
        log.info(
            "aggregation: %s",
            "FFA-LoRA (A frozen and shared, B averaged: exact)"
            if cfg.federation.lora_mode == "ffa"
            else "FedSA-LoRA (A averaged, B personal: stays on each device)"
            if cfg.personal.method == "fedsa"
            else "FedAvg of LoRA A and B separately (mean of B·A is not mean(B)·mean(A): an approximation)",
        )
    if state is not None:
        if state.info.fingerprint != description.fingerprint or state.info.schema != description.schema:
            raise FedpeftError(f"checkpoint {checkpoint} is from another base or adapter schema")
        log.info("resuming after round %d from %s", state.round, checkpoint)
    else:
        state = initial_state(description, init)
        state.history = [{"round": 0, **_evaluate(grid, cfg_record, state, roster), "train_loss": None}]
        save_checkpoint(run_dir, state, cfg)
        write_global(run_dir, state)
        write_metrics(run_dir, state.history)
    bar = tqdm(
        total=cfg.federation.rounds,
        initial=min(state.round, cfg.federation.rounds),
        desc="rounds",
        disable=not cfg.train.progress,
        unit="round",
    )
    bar.set_postfix(ppl=f"{state.history[-1]['eval_ppl']:.2f}")
    while state.round < cfg.federation.rounds:
        start = time.perf_counter()
        round_fn = _secure_train_round if cfg.federation.secagg else _train_round
        state, metrics = round_fn(grid, cfg, cfg_record, state, roster)
        eval_start = time.perf_counter()
        metrics.update(_evaluate(grid, cfg_record, state, roster, _personal_round(cfg, state.round)))
        metrics["eval_seconds"] = time.perf_counter() - eval_start
        _add_base(metrics, state.history)
        metrics["seconds"] = time.perf_counter() - start
        state.history = [*state.history, metrics]
        save_checkpoint(run_dir, state, cfg)
        write_global(run_dir, state)
        write_metrics(run_dir, state.history)
        bar.update(1)
        bar.set_postfix(ppl=f"{metrics['eval_ppl']:.2f}", loss=f"{metrics['eval_loss']:.3f}")
        tqdm.write(
            f"round {state.round}: held-out ppl {metrics['eval_ppl']:.2f} (loss {metrics['eval_loss']:.3f}), "
            f"{len(metrics['accepted'])}/{len(metrics['sampled'])} clients, {metrics['seconds']:.1f} s"
            + (" [skipped]" if metrics.get("skipped") else "")
        )
        if "personal" in metrics:
            from fedpeft.personalize import summary_line

            tqdm.write(f"round {state.round}: " + summary_line(metrics["personal"], cfg.personal.method))
    bar.close()
    return state


def make_server_app(cfg: RunConfig, run_dir: Path, resume: int | None, outcome: Outcome) -> ServerApp:
    """The ServerApp for `fedpeft simulate`: the config comes from our CLI, not Flower's run config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            outcome.state = run_federation(grid, cfg, run_dir, resume)
        except FedpeftError as e:
            outcome.error = str(e)
        except Exception as e:  # reported by `fedpeft simulate`, which exits non-zero
            log.exception("the federation failed")
            outcome.error = f"the federation failed: {type(e).__name__}: {e}"

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point behind a SuperLink (`fedpeft server`, `flwr run`): the config is Flower's run config.
    The outcome goes to RUN/status.json, which `fedpeft server` waits for (Flower's run status does not
    carry our error message)."""
    from fedpeft.checkpoint import atomic_write_json

    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fedpeft: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    run_config = dict(context.run_config)
    run_dir = Path(str(run_config.pop("out", "runs/flwr")))
    resume_round = int(run_config.pop("resume-round", -1))  # -1: a new federation
    resume = resume_round if resume_round >= 0 else None
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = run_federation(grid, from_run_config(run_config), run_dir, resume)
    except FedpeftError as e:
        log.error("%s", e)
        atomic_write_json(run_dir / "status.json", {"state": "failed", "error": str(e)})
        raise
    except Exception as e:
        log.exception("the federation failed")
        atomic_write_json(
            run_dir / "status.json",
            {"state": "failed", "error": f"the federation failed: {type(e).__name__}: {e}"},
        )
        raise
    atomic_write_json(run_dir / "status.json", {"state": "finished", "round": state.round})
