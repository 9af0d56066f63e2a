"""A round's evaluation metrics without Flower: the held-out loss and perplexity over all clients
(`eval_metrics`), each client's personal report (`personal_entry`) and its base-model perplexity
(`add_base`). server/app.py collects the replies; fedpeft.rounds has the training side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.config import RunConfig

log = logging.getLogger("fedpeft")

MAX_LOSS = 50.0  # perplexity is exp(loss) capped here, so a diverged client cannot overflow it


def ppl(loss: float) -> float:
    return math.exp(min(loss, MAX_LOSS))


@dataclass(frozen=True)
class EvalResult:
    """One client's evaluation reply: the global adapter's held-out loss and tokens, and with
    personalization the device's report as it arrived (scalars and short strings, unchecked)."""

    user: str
    loss: float
    tokens: int
    personal: Mapping[str, Any] | None = None


def eval_metrics(results: Sequence[EvalResult]) -> dict[str, Any]:
    """The round's evaluation over the clients that answered (in client order): token-weighted loss and
    its perplexity, the mean of the clients' perplexities, and each client's entry by name. A malformed
    personal report is logged and left out: a device's bad report must not stop the run."""
    per_client, nll, tokens = {}, 0.0, 0
    for r in results:
        entry: dict[str, Any] = {"loss": r.loss, "ppl": ppl(r.loss), "tokens": r.tokens}
        if r.personal is not None:
            try:
                entry.update(personal_entry(r.personal, entry["ppl"]))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("ignored a malformed personal report from %s: %r", r.user, e)
        per_client[r.user] = entry
        nll, tokens = nll + r.loss * r.tokens, tokens + r.tokens
    mean = nll / max(tokens, 1)
    return {
        "eval_loss": mean,
        "eval_ppl": ppl(mean),
        "eval_tokens": tokens,
        "eval_ppl_client_mean": sum(c["ppl"] for c in per_client.values()) / max(len(per_client), 1),
        "eval_per_client": dict(sorted(per_client.items())),
    }


def personal_entry(report: Mapping[str, Any], global_ppl: float) -> dict[str, Any]:
    """A client's personal report (fedpeft.device.Device.personalize) as its metrics entry: which adapter
    it kept and that adapter's perplexity. Raises KeyError, TypeError or ValueError when malformed."""
    p = dict(report)
    entry: dict[str, Any] = {
        "kept": str(p["kept"]),
        "note": str(p.get("note", "")),
        "personal_seconds": float(p["personal_seconds"]),
    }
    if "personal_eval_loss" in p:
        entry["personal_ppl"] = ppl(float(p["personal_eval_loss"]))
    entry["kept_ppl"] = entry["personal_ppl"] if entry["kept"] == "personal" else global_ppl
    for key in ("val_loss_global", "val_loss_personal"):
        if key in p:
            entry[key] = float(p[key])
    return entry


def personal_round(cfg: RunConfig, rnd: int) -> bool:
    """Whether round `rnd` evaluates personal adapters: fedsa and ditto hold them from their first sampled
    round on, so every round; finetune makes them at the federation's last round only."""
    method = cfg.personal.method
    return method != "none" and rnd >= 1 and (method != "finetune" or rnd == cfg.federation.rounds)


def add_base(metrics: dict[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """Each client's base-model perplexity, from round 0: the initial adapter is the identity (LoRA B = 0,
    IA3 vectors = 1; tests/test_personalize.py checks it against the base with the adapter disabled).
    Adds the personalization summary when the round has personal figures."""
    from fedpeft.personalize import summarize

    base = history[0]["eval_per_client"] if history else {}
    for user, entry in metrics["eval_per_client"].items():
        if "kept" in entry and user in base:
            entry["base_ppl"] = base[user]["ppl"]
    summary = summarize(metrics["eval_per_client"])
    if summary is not None:
        metrics["personal"] = summary
