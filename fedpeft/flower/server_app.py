"""Flower ServerApp: the round loop moves messages; fedpeft decides everything (fedpeft.federation.roster: who is in
the federation; fedpeft.federation.state: state, checks, checkpoints; fedpeft.federation.rounds, fedpeft.federation.evaluation and
fedpeft.secagg.server: a round's outcome and metrics).

Round 0 asks every node to describe itself (base fingerprint, client id; one node also sends the adapter
schema, its seeded initial adapter and PEFT config). Each round then: sample clients, send the global
adapter, check and aggregate the replies, evaluate the new global adapter on every client's held-out
text, checkpoint, write metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpeft.config.files import APP_KEYS, from_run_config, to_run_config
from fedpeft.config.tree import RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation import evaluation, rounds
from fedpeft.federation.aggregate import Arrays
from fedpeft.federation.forgetting import forgets, reference_metrics
from fedpeft.federation.roster import Registration, Roster, make_roster
from fedpeft.federation.state import (
    ServerState,
    check_same_adapter,
    checkpoint_path,
    initial_state,
    load_checkpoint,
    save_round,
    skip_round,
)
from fedpeft.flower.records import arrays_to_record, record_to_arrays
from fedpeft.log import Waiting
from fedpeft.model.adapter_files import AdapterDescription
from fedpeft.privacy.plan import DpPlan
from fedpeft.privacy.plan import note as dp_note
from fedpeft.privacy.plan import plan as privacy_plan

log = logging.getLogger("fedpeft")


@dataclass
class Outcome:
    """What the loop hands back to `fedpeft simulate` (Flower's runner swallows exceptions)."""

    state: ServerState | None = None
    error: str | None = None


@dataclass
class _Link:
    """The way to the clients: the grid, the run config every message carries, the roster once known."""

    grid: Grid
    config: ConfigRecord
    roster: Roster = field(default_factory=Roster)
    # keys clients advertised for the next secure round with their evaluation: {client: (task, keys)}
    advertised: dict[int, tuple[dict[str, Any], tuple[bytes, bytes, bytes]]] = field(default_factory=dict)
    dp: DpPlan | None = None  # the federation's differential privacy, when on
    sampled_evaluation: bool = False  # --fraction-evaluate < 1: round 0 covered a sample only
    reference: bool = False  # clients also score the reference text (--reference-text)
    progress: bool = True  # --progress: a long wait for replies shows how many came (fedpeft.log.Waiting)

    def message(self, node: int, kind: str, task: dict[str, Any], arrays: Arrays | None = None) -> Message:
        content = RecordDict({"config": self.config, "task": ConfigRecord(task)})
        if arrays is not None:
            content["arrays"] = arrays_to_record(arrays)
        return Message(content, dst_node_id=node, message_type=kind)

    def exchange(self, messages: dict[int, Message]) -> dict[int, Message]:
        """Send, wait, and key each reply as its message was keyed. A reply is matched by the message it
        answers, not by its sender: an error reply the SuperLink makes for a node that stopped sending
        heartbeats (a device gone mid-round) comes from the SuperLink's own node id."""
        order = list(messages.items())
        kinds = sorted({m.metadata.message_type for _, m in order})
        what = {"query": "registering clients", "train": "training", "evaluate": "evaluating"}
        desc = ", ".join(what.get(k.split(".")[0], k) for k in kinds) or "waiting"
        with Waiting(desc, len(order), "replies", enabled=self.progress) as wait:
            replies = _send_and_receive(self.grid, [m for _, m in order], wait.update)
        key_of = {m.metadata.message_id: k for k, m in order}
        answered = [r for r in replies if r.metadata.reply_to_message_id in key_of]
        return {key_of[r.metadata.reply_to_message_id]: r for r in answered}

    def send(self, kind: str, task: dict, to: list[int], arrays: Arrays | None = None) -> dict[int, Message]:
        """The task (naming each client's index and the base), and the global adapter, to each client."""
        node_of, task_for = self.roster.node_of, self.roster.task
        return self.exchange({c: self.message(node_of[c], kind, task_for(c, **task), arrays) for c in to})


# Grid.send_and_receive sleeps 3 s between pulls (flwr 1.42), longer than most stages. With a fixed 0.1 s
# poll a local SuperLink used about half a core through a deployed round (10 pulls a second all through a
# minute of training); backing off to 1 s costs at most a second per stage and keeps quick stages quick.
POLL_SECONDS, POLL_MAX_SECONDS = 0.1, 1.0


def _send_and_receive(
    grid: Grid, messages: list[Message], progress: Callable[[int], None] | None = None
) -> list[Message]:
    """Grid.send_and_receive with a short poll: push, then pull until every message has its reply (the
    SuperLink answers for a node that died with an error reply, so this ends). `progress(n)` hears of
    each batch of n replies."""
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    delay = POLL_SECONDS
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        if progress is not None:  # every poll, replies or not: a long silence still gets its line
            progress(len(got))
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            # never a busy loop: each pull checks every waiting id, and with 10,000 virtual clients a pull
            # after every single reply kept a core busy beside the client actor on a 2-core machine
            delay = POLL_SECONDS if got else min(delay * 1.5, POLL_MAX_SECONDS)
            time.sleep(delay)
    return replies


def _error_text(reply: Message) -> str:
    return reply.error.reason.strip().splitlines()[-1][:300] if reply.has_error() else ""


def _register(link: _Link, cfg: RunConfig, pinned: str = "") -> tuple[AdapterDescription, Arrays]:
    """Ask every node who it is (fedpeft.federation.roster makes the federation of the answers: link.roster), and have
    the first client on the federation's base describe the adapter. Returns the adapter description and
    the initial arrays."""
    f = cfg.federation
    deadline = time.monotonic() + f.connect_timeout
    while len(nodes := sorted(link.grid.get_node_ids())) < f.clients and time.monotonic() <= deadline:
        time.sleep(1.0)
    if len(nodes) < max(f.min_clients, 1):
        raise FedpeftError(
            f"only {len(nodes)} of {f.clients} clients connected within {f.connect_timeout:.0f} s"
        )
    if len(nodes) < f.clients:
        log.warning("%d of %d clients connected; going on without the others", len(nodes), f.clients)
    answers = link.exchange({node: link.message(node, MessageType.QUERY, {}) for node in nodes})
    replies = [(n, answers[n]) for n in nodes if n in answers]
    registered = [Registration.from_info(n, r.content["info"]) for n, r in replies if not r.has_error()]
    failures = [_error_text(r) for _, r in replies if r.has_error()]
    roster = link.roster = make_roster(registered, failures, f.clients, f.min_clients, pinned)
    describer = roster.on_base()[0]
    reply = link.send(MessageType.QUERY, {"with-init": True}, [describer])[describer]
    if reply.has_error():
        raise FedpeftError(
            f"client {roster.names[describer]} failed to describe the adapter: {_error_text(reply)}"
        )
    description = AdapterDescription.from_json(json.loads(reply.content["description"]["json"]))
    return description, record_to_arrays(reply.content["init"])


def _evaluate(
    link: _Link,
    state: ServerState,
    personal: bool = False,
    ahead: dict[int, dict[str, Any]] | None = None,
    full: bool = False,
    last: bool = False,
    members: list[int] | None = None,
) -> dict[str, Any]:
    """The global adapter on every client's held-out text; with `personal`, each client also evaluates its
    personal adapter and reports which of the two it keeps (scalars only), and in the `last` round also
    on other users' text where it has any (a simulation: the specificity); with `full`, also on the
    unquantized base (round 0 and the last round: evaluation.full_base_round). `ahead`: the next secure round's
    stage-1 tasks, which ride along (fedpeft.secagg.server.advertise_ahead); their keys go to
    link.advertised. `members`: the clients to evaluate (default: every client on the base)."""
    arrays, names = state.travel_arrays(), link.roster.names
    members = link.roster.on_base() if members is None else members
    task = {
        "round": state.round,
        **({"personal": True} if personal else {}),
        **({"full_base": True} if full else {}),
        **({"specificity": True} if personal and last else {}),
        # a sample: each client also scores the base on the same text (the device computes it once)
        **({"with_base": True} if state.round > 0 and link.sampled_evaluation else {}),
        # the forgetting guard's yardstick (fedpeft.federation.forgetting)
        **({"reference": True} if link.reference else {}),
    }
    ahead = ahead or {}
    messages = {c: link.message(link.roster.node_of[c], MessageType.EVALUATE, link.roster.task(c, **task), arrays)
                for c in members}  # fmt: skip
    for c, stage1 in ahead.items():
        if c in messages:
            messages[c].content["secagg-next"] = ConfigRecord(stage1)
    results, references = [], []
    link.advertised = {}
    for c, reply in sorted(link.exchange(messages).items()):
        if c in ahead and not reply.has_error() and "secagg-keys" in reply.content:
            from fedpeft.secagg.flower import read_keys

            with contextlib.suppress(KeyError, TypeError, ValueError):
                link.advertised[c] = (ahead[c], read_keys(reply.content, "secagg-keys"))
        if reply.has_error():
            log.warning("evaluation failed on %s: %s", names[c], _error_text(reply))
            continue
        m, user = reply.content["metrics"], names[int(reply.content["info"]["client"])]
        loss, tokens = float(m["eval_loss"]), int(m["eval_tokens"])
        full_loss = float(m["full_eval_loss"]) if "full_eval_loss" in m else None
        base = {k: float(m[k]) for k in ("base_loss", "full_base_loss") if k in m}
        references.append({k: float(m[k]) for k in ("reference_loss", "base_reference_loss") if k in m})
        results.append(
            evaluation.EvalResult(
                user,
                loss,
                tokens,
                reply.content.get("personal"),
                full_loss,
                **base,
                task=_task_entry(m, user),
            )
        )
    bytes_down = sum(a.nbytes for a in arrays.values()) * len(members)
    out = {**evaluation.eval_metrics(results), **reference_metrics(references), "bytes_down_eval": bytes_down}
    if len(members) < len(link.roster.on_base()):
        out["eval_of"] = len(link.roster.on_base())  # a --fraction-evaluate sample of this many
    return out


def _task_entry(m: Any, user: str) -> dict[str, Any] | None:
    """A client's task scores (fedpeft.federation.task_eval), or None; a malformed report is left out, not fatal."""
    from fedpeft.federation.task_eval import client_entry

    try:
        return client_entry(m)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("ignored a malformed task report from %s: %r", user, e)
        return None


def _train_round(link: _Link, cfg: RunConfig, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
    rnd = state.round + 1
    sampled = link.roster.sample(cfg.federation, rnd, poisson=link.dp is not None)
    updates: dict[int, rounds.Update | str] = {}
    for c, reply in link.send(MessageType.TRAIN, {"round": rnd}, sampled, state.travel_arrays()).items():
        if reply.has_error():
            updates[c] = _error_text(reply)
            continue
        try:
            delta, info = record_to_arrays(reply.content["delta"]), reply.content["info"]
        except (KeyError, TypeError, ValueError) as e:  # a client's malformed reply drops that client only
            updates[c] = f"malformed reply: {e}"[:300]
            continue
        updates[c] = rounds.Update(delta, str(info["fingerprint"]), reply.content["metrics"])
    return rounds.plain_round(state, cfg, link.roster.names, sampled, updates, link.dp)


def _secure_round(link: _Link, cfg: RunConfig, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
    """One round under SecAgg+ (fedpeft.secagg.server); here only how its stage messages travel."""
    from fedpeft.secagg.server import secure_round

    rnd, arrays, roster = state.round + 1, state.travel_arrays(), link.roster

    def send(payloads: dict[int, dict[str, Any]]) -> dict[int, Message]:
        messages = {}
        for c, p in payloads.items():
            # stage 3 trains: only its message carries the global adapter
            travel = arrays if p["task"]["secagg-stage"] == 3 else None
            task = roster.task(c, **p["task"], round=rnd)
            messages[c] = link.message(roster.node_of[c], MessageType.TRAIN, task, travel)
            messages[c].content.update({k: record for k, record in p.items() if k != "task"})
        return link.exchange(messages)

    advertised, link.advertised = link.advertised, {}  # each advertisement serves one round
    sampled = roster.sample(cfg.federation, rnd, poisson=link.dp is not None)
    return secure_round(state, cfg, roster.names, roster.examples, sampled, send, advertised, link.dp)


def _ahead(link: _Link, cfg: RunConfig, state: ServerState) -> dict[int, dict[str, Any]]:
    """The next secure round's stage 1, to fold into this round's evaluation (one stage less a round)."""
    from fedpeft.secagg.server import advertise_ahead

    rnd = state.round + 1
    if not cfg.federation.secagg or rnd > cfg.federation.rounds:
        return {}
    sampled = link.roster.sample(cfg.federation, rnd, poisson=link.dp is not None)
    if len(sampled) < cfg.federation.min_clients:  # a small Poisson sample: that round is skipped
        return {}
    return advertise_ahead(cfg, state.info.fingerprint, rnd, sampled)


def run_federation(grid: Grid, cfg: RunConfig, run_dir: Path, resume: int | None = None) -> ServerState:
    """The whole federation, or its continuation from the checkpoint of round `resume` (which the entry
    point verified before writing anything); returns the final state. Raises FedpeftError on
    unrecoverable input."""
    link = _Link(grid, ConfigRecord(to_run_config(cfg)))
    link.sampled_evaluation = cfg.federation.fraction_evaluate < 1
    link.reference = cfg.data.reference_text != "off"
    link.progress = cfg.train.progress
    checkpoint = checkpoint_path(run_dir, resume) if resume is not None else None
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    pinned = state.info.fingerprint if state is not None else cfg.federation.base_fingerprint
    description, init = _register(link, cfg, pinned)
    link.dp = privacy_plan(cfg, len(link.roster.on_base()), state.history if state is not None else ())
    if link.dp is not None:
        log.info("%s", dp_note(link.dp, cfg.federation.rounds))
    if cfg.adapter.kind == "lora":
        log.info("aggregation: %s", rounds.aggregation_note(cfg))
    if state is not None:
        check_same_adapter(state, description, checkpoint)
        log.info("resuming after round %d from %s", state.round, checkpoint)
    else:
        state = initial_state(description, init)
        full = evaluation.full_base_round(cfg, 0, description.quant)
        state.history = [
            {
                "round": 0,
                "quant": description.quant,  # as the devices loaded it (`auto` resolved)
                # what each client computes in and why: each device chooses for itself (fedpeft.model.precision)
                **rounds.compute_metrics(link.roster.names, link.roster.compute),
                # where a simulation's clients compute (--device resolved; deployed devices run on CPU)
                **({"device": cfg.base.device} if cfg.base.device != "auto" else {}),
                **({"full_base": cfg.base.full_base} if full else {}),
                **_evaluate(
                    link,
                    state,
                    ahead=_ahead(link, cfg, state),
                    full=full,
                    members=evaluation.eval_clients(cfg, 0, link.roster.on_base()),
                ),
                "train_loss": None,
            }
        ]
        save_round(run_dir, state, cfg)
    progress = rounds.Progress(cfg, state)
    while state.round < cfg.federation.rounds:
        if link.dp is not None and not link.dp.allows_spent(link.dp.next_round(state.history)):
            log.warning(
                "stopped before round %d: it would spend more than --dp-epsilon %g",
                state.round + 1,
                link.dp.budget,
            )
            break
        start, before = time.perf_counter(), state
        state, metrics = (_secure_round if cfg.federation.secagg else _train_round)(link, cfg, state)
        eval_start = time.perf_counter()
        members = evaluation.eval_clients(cfg, state.round, link.roster.on_base())
        if members:
            personal = evaluation.personal_round(cfg, state.round)
            full = evaluation.full_base_round(cfg, state.round, state.info.quant)
            last = state.round == cfg.federation.rounds
            ahead = _ahead(link, cfg, state)
            metrics.update(_evaluate(link, state, personal, ahead, full, last, members))
            metrics["eval_seconds"] = time.perf_counter() - eval_start
            evaluation.add_base(metrics, state.history)
        if not metrics.get("skipped") and (why := forgets(metrics, cfg.federation.max_forgetting)):
            log.warning("round %d kept the previous global adapter: %s", state.round, why)
            state = skip_round(before)  # its noise, if any, was still released: dp accounts for it below
            metrics["kept_previous"] = why
        if link.dp is not None:
            metrics["dp"] = link.dp.metrics(state.history, metrics)
        metrics.pop("dp_sum", None)  # in `dp` now
        metrics["seconds"] = time.perf_counter() - start
        state.history = [*state.history, metrics]
        save_round(run_dir, state, cfg)
        progress.round(metrics)
    progress.close()
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
    from fedpeft.atomic import atomic_write_json
    from fedpeft.log import setup_console

    setup_console()
    run_config = dict(context.run_config)
    app_keys = {key: run_config.pop(key, default) for key, default in APP_KEYS.items()}
    run_dir, resume = Path(str(app_keys["out"])), int(app_keys["resume-round"])  # -1: a new federation
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        state = run_federation(grid, from_run_config(run_config), run_dir, resume if resume >= 0 else None)
    except FedpeftError as e:
        log.error("%s", e)
        atomic_write_json(run_dir / "status.json", {"state": "failed", "error": str(e)})
        raise
    except Exception as e:
        log.exception("the federation failed")
        error = f"the federation failed: {type(e).__name__}: {e}"
        atomic_write_json(run_dir / "status.json", {"state": "failed", "error": error})
        raise
    atomic_write_json(run_dir / "status.json", {"state": "finished", "round": state.round})
