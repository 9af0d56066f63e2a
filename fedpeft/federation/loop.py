"""The round loop: a federation of clients reached over a transport (fedpeft.federation.transport), Flower's grid
in simulation and deployment (fedpeft.flower.grid), an in-process one in tests. Here everything a round
decides; the parts are elsewhere: fedpeft.federation.roster (who is in the federation), state (state, checks,
checkpoints), rounds, evaluation and fedpeft.federation.secure_round (a round's outcome and metrics), forgetting (the
guard), fedpeft.privacy.plan (the DP budget).

Round 0 asks every node to describe itself (base fingerprint, client id; one node also sends the adapter
schema, its seeded initial adapter and PEFT config). Each round then: sample clients, send the global
adapter, check and aggregate the replies, evaluate the new global adapter on every client's held-out
text, checkpoint, write metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedpeft.config.files import to_run_config
from fedpeft.config.tree import RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.federation import evaluation, rounds
from fedpeft.federation.aggregate import Arrays
from fedpeft.federation.forgetting import forgets, reference_metrics
from fedpeft.federation.ranks import effective_rank
from fedpeft.federation.roster import Registration, Roster, make_roster
from fedpeft.federation.secure_round import advertise_ahead, secure_round
from fedpeft.federation.state import (
    ServerState,
    check_same_adapter,
    checkpoint_path,
    initial_state,
    load_checkpoint,
    save_round,
    skip_round,
)
from fedpeft.federation.tasks import EvalRequest, error_text, read_evaluation, read_update
from fedpeft.federation.transport import Transport, describe
from fedpeft.federation.wire import arrays_to_record, record_to_arrays
from fedpeft.model.adapter_files import AdapterDescription
from fedpeft.model.fed_sb import fold
from fedpeft.privacy.plan import DpPlan
from fedpeft.privacy.plan import note as dp_note
from fedpeft.privacy.plan import plan as privacy_plan
from fedpeft.secagg.server_stages import read_keys

log = logging.getLogger("fedpeft")


class Federation:
    """One federation's rounds over `transport`, its files in `run_dir`. `run()` runs them."""

    def __init__(self, transport: Transport, cfg: RunConfig, run_dir: Path) -> None:
        self.transport, self.cfg, self.run_dir = transport, cfg, run_dir
        self.config = ConfigRecord(to_run_config(cfg))  # every message carries the run's flat config
        self.roster = Roster()  # who is in the federation, once registered
        # keys clients advertised for the next secure round with their evaluation: {client: (task, keys)}
        self.advertised: dict[int, tuple[dict[str, Any], tuple[bytes, bytes, bytes]]] = {}
        self.dp: DpPlan | None = None  # the federation's differential privacy, when on
        self.sampled_evaluation = cfg.federation.fraction_evaluate < 1  # round 0 covered a sample only
        self.reference = cfg.data.reference_text != "off"  # clients also score the reference text

    # --- the run --------------------------------------------------------------------------------------

    def run(self, resume: int | None = None) -> ServerState:
        """The whole federation, or its continuation from the checkpoint of round `resume` (which the entry
        point verified before writing anything); returns the final state. Raises FedpeftError on
        unrecoverable input."""
        cfg = self.cfg
        checkpoint = checkpoint_path(self.run_dir, resume) if resume is not None else None
        state = load_checkpoint(checkpoint) if checkpoint is not None else None
        pinned = state.info.fingerprint if state is not None else cfg.federation.base_fingerprint
        description, init = self.register(pinned)
        self.dp = privacy_plan(cfg, len(self.roster.on_base()), state.history if state is not None else ())
        if self.dp is not None:
            log.info("%s", dp_note(self.dp, cfg.federation.rounds))
        if cfg.adapter.kind in ("lora", "dora", "vera"):
            log.info("aggregation: %s", rounds.aggregation_note(cfg))
        if state is not None:
            check_same_adapter(state, description, checkpoint)
            log.info("resuming after round %d from %s", state.round, checkpoint)
        else:
            state = self.start(description, init)
        progress = rounds.Progress(cfg, state)
        while state.round < cfg.federation.rounds and self.within_budget(state):
            state, metrics = self.round(state)
            progress.round(metrics)
        progress.close()
        return state

    def start(self, description: AdapterDescription, init: Arrays) -> ServerState:
        """Round 0: the initial adapter, evaluated (the baseline every round compares with), checkpointed."""
        cfg, roster = self.cfg, self.roster
        state = initial_state(description, init)
        full = evaluation.full_base_round(cfg, 0, description.quant)
        zero: dict[str, Any] = {
            "round": 0,
            "quant": description.quant,  # as the devices loaded it (`auto` resolved)
            # what each client computes in and why: each device chooses for itself (fedpeft.model.precision)
            **rounds.compute_metrics(roster.names, roster.compute),
        }
        if quants := roster.mixed_quants():  # devices of several quantizations of the base: who ran what
            zero["quants"] = {roster.names[c]: q for c, q in quants.items()}
            zero["quant"] = "+".join(sorted(set(quants.values())))
        if cfg.base.device != "auto":  # where a simulation's clients compute (deployed devices: CPU)
            zero["device"] = cfg.base.device
        if full:
            zero["full_base"] = cfg.base.full_base
        ahead = self.ahead(state)
        members = evaluation.eval_clients(cfg, 0, roster.on_base())
        zero.update(self.evaluate(state, self.request(0, full=full), members, ahead))
        zero["train_loss"] = None
        state.history = [zero]
        save_round(self.run_dir, state, cfg)
        return state

    def within_budget(self, state: ServerState) -> bool:
        """Whether the next round keeps the DP budget (always, without DP); says so when it does not."""
        if self.dp is None or self.dp.allows_spent(self.dp.next_round(state.history)):
            return True
        budget = self.dp.budget
        log.warning(
            "stopped before round %d: it would spend more than --dp-epsilon %g", state.round + 1, budget
        )
        return False

    def round(self, before: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One round: train (plain or secure) and aggregate, evaluate when scheduled, the forgetting guard,
        the DP accounting; the new state (its metrics added to its history, checkpointed) and the metrics."""
        cfg, start = self.cfg, time.perf_counter()
        state, metrics = (self.train_secure if cfg.federation.secagg else self.train_plain)(before)
        self.evaluate_round(state, metrics)
        if not metrics.get("skipped") and (why := forgets(metrics, cfg.federation.max_forgetting)):
            log.warning("round %d kept the previous global adapter: %s", state.round, why)
            state = skip_round(before)  # its noise, if any, was still released: dp accounts for it below
            metrics["kept_previous"] = why
        if self.dp is not None:
            metrics["dp"] = self.dp.metrics(state.history, metrics)
        metrics.pop("dp_sum", None)  # in `dp` now
        if (
            rank := effective_rank(fold(state.arrays) if state.info.adapter.lora_sb else state.arrays)
        ) is not None:
            metrics["effective_rank"] = rank  # a LoRA adapter collapsing into a smaller rank shows here
        metrics["seconds"] = time.perf_counter() - start
        state.history = [*state.history, metrics]
        save_round(self.run_dir, state, cfg)
        return state, metrics

    def evaluate_round(self, state: ServerState, metrics: dict[str, Any]) -> None:
        """The round's evaluation, when scheduled (--eval-every, --fraction-evaluate), into `metrics`."""
        cfg, start = self.cfg, time.perf_counter()
        members = evaluation.eval_clients(cfg, state.round, self.roster.on_base())
        if not members:
            return
        personal = evaluation.personal_round(cfg, state.round)
        full = evaluation.full_base_round(cfg, state.round, state.info.quant)
        last = state.round == cfg.federation.rounds
        ahead = self.ahead(state)
        metrics.update(self.evaluate(state, self.request(state.round, personal, full, last), members, ahead))
        metrics["eval_seconds"] = time.perf_counter() - start
        evaluation.add_base(metrics, state.history)

    # --- messages -------------------------------------------------------------------------------------

    def message(self, node: int, kind: str, task: dict[str, Any], arrays: Arrays | None = None) -> Message:
        """A message to `node`: the run's config, the task and, when given, the global adapter."""
        content = RecordDict({"config": self.config, "task": ConfigRecord(task)})
        if arrays is not None:
            content["arrays"] = arrays_to_record(arrays)
        return Message(content, dst_node_id=node, message_type=kind)

    def exchange(self, messages: dict[int, Message]) -> dict[int, Message]:
        """Send, wait, and key each reply as its message was keyed (fedpeft.federation.transport)."""
        return self.transport.exchange(messages, describe(messages))

    def send(self, kind: str, task: dict, to: list[int], arrays: Arrays | None = None) -> dict[int, Message]:
        """The task (naming each client's index and the base), and the global adapter, to each client."""
        node_of, task_for = self.roster.node_of, self.roster.task
        return self.exchange({c: self.message(node_of[c], kind, task_for(c, **task), arrays) for c in to})

    # --- the stages of a round ------------------------------------------------------------------------

    def register(self, pinned: str = "") -> tuple[AdapterDescription, Arrays]:
        """Ask every node who it is (fedpeft.federation.roster makes the federation of the answers:
        self.roster), and have the first client on the federation's base describe the adapter. Returns the
        adapter description and the initial arrays."""
        f = self.cfg.federation
        deadline = time.monotonic() + f.connect_timeout
        while len(nodes := sorted(self.transport.node_ids())) < f.clients and time.monotonic() <= deadline:
            time.sleep(1.0)
        if len(nodes) < max(f.min_clients, 1):
            raise FedpeftError(
                f"only {len(nodes)} of {f.clients} clients connected within {f.connect_timeout:.0f} s"
            )
        if len(nodes) < f.clients:
            log.warning("%d of %d clients connected; going on without the others", len(nodes), f.clients)
        answers = self.exchange({node: self.message(node, MessageType.QUERY, {}) for node in nodes})
        replies = [(n, answers[n]) for n in nodes if n in answers]
        registered = [Registration.from_info(n, r.content["info"]) for n, r in replies if not r.has_error()]
        failures = [error_text(r) for _, r in replies if r.has_error()]
        roster = self.roster = make_roster(registered, failures, f.clients, f.min_clients, pinned)
        describer = roster.on_base()[0]
        reply = self.send(MessageType.QUERY, {"with-init": True}, [describer])[describer]
        if reply.has_error():
            raise FedpeftError(
                f"client {roster.names[describer]} failed to describe the adapter: {error_text(reply)}"
            )
        description = AdapterDescription.from_json(json.loads(reply.content["description"]["json"]))
        # the federation's base as registration settled it: the source weights its clients share (any
        # quantization of them) or the exact base pinned (fedpeft.federation.roster)
        description = dataclasses.replace(description, fingerprint=roster.fingerprint)
        return description, record_to_arrays(reply.content["init"])

    def train_plain(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """A plain round: the sampled clients' updates, checked and aggregated (fedpeft.federation.rounds)."""
        rnd = state.round + 1
        sampled = self.roster.sample(self.cfg.federation, rnd, poisson=self.dp is not None)
        replies = self.send(MessageType.TRAIN, {"round": rnd}, sampled, state.travel_arrays())
        updates = {c: read_update(reply) for c, reply in replies.items()}
        return rounds.plain_round(state, self.cfg, self.roster.names, sampled, updates, self.dp)

    def train_secure(self, state: ServerState) -> tuple[ServerState, dict[str, Any]]:
        """One round under SecAgg+ (fedpeft.federation.secure_round); here only how its stage messages travel."""
        rnd, arrays, roster = state.round + 1, state.travel_arrays(), self.roster

        def send(payloads: dict[int, dict[str, Any]]) -> dict[int, Message]:
            messages = {}
            for c, p in payloads.items():
                # stage 3 trains: only its message carries the global adapter
                travel = arrays if p["task"]["secagg-stage"] == 3 else None
                task = roster.task(c, **p["task"], round=rnd)
                messages[c] = self.message(roster.node_of[c], MessageType.TRAIN, task, travel)
                messages[c].content.update({k: record for k, record in p.items() if k != "task"})
            return self.exchange(messages)

        advertised, self.advertised = self.advertised, {}  # each advertisement serves one round
        sampled, dp = roster.sample(self.cfg.federation, rnd, poisson=self.dp is not None), self.dp
        return secure_round(
            state, self.cfg, roster.names, roster.examples, sampled, send, advertised, dp, roster.ranks
        )

    def ahead(self, state: ServerState) -> dict[int, dict[str, Any]]:
        """The next secure round's stage 1, to fold into this round's evaluation (one stage less a round)."""
        rnd, f = state.round + 1, self.cfg.federation
        if not f.secagg or rnd > f.rounds:
            return {}
        sampled = self.roster.sample(f, rnd, poisson=self.dp is not None)
        if len(sampled) < f.min_clients:  # a small Poisson sample: that round is skipped
            return {}
        return advertise_ahead(self.cfg, state.info.fingerprint, rnd, sampled)

    def request(
        self, rnd: int, personal: bool = False, full: bool = False, last: bool = False
    ) -> EvalRequest:
        """Round `rnd`'s evaluation: `personal` and `full` (the unquantized base) as scheduled; the specificity
        in a personal run's `last` round; against the base on the same text when evaluation samples."""
        with_base = rnd > 0 and self.sampled_evaluation
        return EvalRequest(rnd, personal, full, personal and last, with_base, self.reference)

    def evaluate(
        self,
        state: ServerState,
        request: EvalRequest,
        members: list[int] | None = None,
        ahead: dict[int, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The global adapter on `members`' held-out text (default: every client on the base), as `request`
        asks; the round's evaluation metrics. `ahead`: the next secure round's stage-1 tasks, which ride
        along (fedpeft.federation.secure_round.advertise_ahead); their keys go to self.advertised."""
        arrays, roster = state.travel_arrays(), self.roster
        members = roster.on_base() if members is None else members
        task, ahead = request.task(), ahead or {}
        messages = {c: self.message(roster.node_of[c], MessageType.EVALUATE, roster.task(c, **task), arrays)
                    for c in members}  # fmt: skip
        for c, stage1 in ahead.items():
            if c in messages:
                messages[c].content["secagg-next"] = ConfigRecord(stage1)
        results, references = [], []
        self.advertised = {}
        for c, reply in sorted(self.exchange(messages).items()):
            if c in ahead and not reply.has_error() and "secagg-keys" in reply.content:
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    self.advertised[c] = (ahead[c], read_keys(reply.content, "secagg-keys"))
            if reply.has_error():
                log.warning("evaluation failed on %s: %s", roster.names[c], error_text(reply))
                continue
            result, reference = read_evaluation(reply, roster.names)
            results.append(result)
            references.append(reference)
        bytes_down = sum(a.nbytes for a in arrays.values()) * len(members)
        out = {**evaluation.eval_metrics(results), **reference_metrics(references)}
        out["bytes_down_eval"] = bytes_down
        if len(members) < len(roster.on_base()):
            out["eval_of"] = len(roster.on_base())  # a --fraction-evaluate sample of this many
        return out
