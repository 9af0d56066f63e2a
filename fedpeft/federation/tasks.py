"""What the round loop (fedpeft.federation.loop) asks of clients and reads back from them: the evaluation's
task record, and a training or evaluation reply read into fedpeft.federation.rounds' and
fedpeft.federation.evaluation's types. A client's malformed reply costs that client only, never the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from flwr.app import Message

from fedpeft.federation import evaluation, rounds
from fedpeft.federation.task_eval import client_entry
from fedpeft.federation.wire import record_to_arrays

log = logging.getLogger("fedpeft")


def error_text(reply: Message) -> str:
    """An error reply's one-line reason (its last line: a traceback ends with the exception)."""
    return reply.error.reason.strip().splitlines()[-1][:300] if reply.has_error() else ""


@dataclass(frozen=True)
class EvalRequest:
    """What one evaluation asks of every client (fedpeft.device.tasks reads it): the global adapter
    on the client's held-out text, and each flag's extra."""

    round: int
    # each client also evaluates its personal adapter and reports which of the two it keeps (scalars only)
    personal: bool = False
    # also on the unquantized base (round 0 and the last round: evaluation.full_base_round)
    full_base: bool = False
    # personal, in the last round: also on other users' text where it has any (a simulation)
    specificity: bool = False
    # a --fraction-evaluate sample: each client also scores the base on the same text (computed once)
    with_base: bool = False
    # the reference text: the forgetting guard's yardstick (fedpeft.federation.forgetting)
    reference: bool = False

    def task(self) -> dict[str, Any]:
        """The task record: the round, and each flag only when set (a client reads a flag by its presence)."""
        task: dict[str, Any] = {"round": self.round}
        for flag in fields(self)[1:]:
            if getattr(self, flag.name):
                task[flag.name] = True
        return task


def read_update(reply: Message) -> rounds.Update | str:
    """A plain round's reply: the client's update, or why there is none (its error, a malformed reply)."""
    if reply.has_error():
        return error_text(reply)
    try:
        delta, info = record_to_arrays(reply.content["delta"]), reply.content["info"]
    except (KeyError, TypeError, ValueError) as e:  # a client's malformed reply drops that client only
        return f"malformed reply: {e}"[:300]
    source = str(info["source"]) if "source" in info else ""
    return rounds.Update(delta, str(info["fingerprint"]), reply.content["metrics"], source)


def read_evaluation(reply: Message, names: dict[int, str]) -> tuple[evaluation.EvalResult, dict[str, float]]:
    """A successful evaluation reply: the client's result, and its reference-text losses (the forgetting
    guard's, fedpeft.federation.forgetting.reference_metrics)."""
    m, user = reply.content["metrics"], names[int(reply.content["info"]["client"])]
    loss, tokens = float(m["eval_loss"]), int(m["eval_tokens"])
    full_loss = float(m["full_eval_loss"]) if "full_eval_loss" in m else None
    base = {k: float(m[k]) for k in ("base_loss", "full_base_loss") if k in m}
    reference = {k: float(m[k]) for k in ("reference_loss", "base_reference_loss") if k in m}
    personal = reply.content.get("personal")
    result = evaluation.EvalResult(user, loss, tokens, personal, full_loss, **base, task=_task_entry(m, user))
    return result, reference


def _task_entry(m: Any, user: str) -> dict[str, Any] | None:
    """A client's task scores (fedpeft.federation.task_eval), or None; a malformed report is left out, not fatal."""
    try:
        return client_entry(m)
    except (KeyError, TypeError, ValueError) as e:
        log.warning("ignored a malformed task report from %s: %r", user, e)
        return None
