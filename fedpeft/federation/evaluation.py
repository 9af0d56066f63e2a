"""A round's evaluation metrics without Flower: the held-out loss and perplexity over all clients
(`eval_metrics`), each client's personal report (`personal_entry`), and the change against the
quantized and the unquantized base of round 0 (`add_base`). fedpeft.federation.loop collects the replies; fedpeft.federation.rounds has the training side.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.config.tree import RunConfig
from fedpeft.federation.metrics import RoundMetrics, base_name
from fedpeft.federation.personal_summary import gain, specificity, summarize
from fedpeft.federation.state import sample_clients
from fedpeft.federation.task_eval import add_task_changes, client_entry, pooled, task_kind
from fedpeft.personal.strategies import strategy_for

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
    full_loss: float | None = None  # the same adapter on the unquantized base (round 0 and the last)
    base_loss: float | None = None  # a sampled evaluation: the base alone on the same text
    full_base_loss: float | None = None  # ... and the unquantized base alone (full-base rounds)
    task: Mapping[str, Any] | None = None  # task data: its scores (fedpeft.federation.task_eval.client_entry)


def eval_metrics(results: Sequence[EvalResult]) -> dict[str, Any]:
    """The round's evaluation over the clients that answered (in client order): token-weighted loss and
    its perplexity, the mean of the clients' perplexities, and each client's entry by name. A malformed
    personal report is logged and left out: a device's bad report must not stop the run. No client at all
    (every evaluation failed): no figures, only `eval_failed`, so the round reads as not evaluated rather than
    as a perplexity of 1."""
    if not results:
        return {"eval_failed": True}
    per_client, nll, tokens, full_nll, full_tokens, full_clients = {}, 0.0, 0, 0.0, 0, 0
    for r in results:
        entry: dict[str, Any] = {"loss": r.loss, "ppl": ppl(r.loss), "tokens": r.tokens}
        if r.base_loss is not None:
            entry["base_loss"] = r.base_loss
        if r.full_base_loss is not None:
            entry["full_base_loss"] = r.full_base_loss
        if r.task is not None:
            entry["task"] = dict(r.task)
        if r.full_loss is not None:
            entry["full_ppl"] = ppl(r.full_loss)
            full_nll, full_tokens = full_nll + r.full_loss * r.tokens, full_tokens + r.tokens
            full_clients += 1
        if r.personal is not None:
            try:
                entry.update(personal_entry(r.personal, entry["ppl"]))
            except (KeyError, TypeError, ValueError) as e:
                log.warning("ignored a malformed personal report from %s: %r", r.user, e)
        per_client[r.user] = entry
        nll, tokens = nll + r.loss * r.tokens, tokens + r.tokens
    mean = nll / max(tokens, 1)
    out = {
        "eval_loss": mean,
        "eval_ppl": ppl(mean),
        "eval_tokens": tokens,
        "eval_ppl_client_mean": sum(c["ppl"] for c in per_client.values()) / max(len(per_client), 1),
        "eval_per_client": dict(sorted(per_client.items())),
    }
    if any(r.task for r in results):  # task data: the pooled task figures (fedpeft.federation.task_eval)
        kind = task_kind([r.task for r in results if r.task])
        for user, entry in per_client.items():  # a client reporting another kind of task is left out
            if (
                entry.get("task", {}).get("kind", kind) != kind
                or entry.get("personal_task", {}).get("kind", kind) != kind
            ):
                log.warning("ignored %s's task report: not a %s task as the others'", user, kind)
                entry.pop("task", None)
                entry.pop("personal_task", None)
        out["task"] = pooled([e["task"] for e in per_client.values() if "task" in e])
    if full_tokens:  # over the clients that reported it: all of them unless one failed or lacked the memory
        out["full_eval_loss"] = full_nll / full_tokens
        out["full_eval_ppl"] = ppl(full_nll / full_tokens)
        out["full_eval_clients"] = full_clients
    return out


def changes_text(m: RoundMetrics | Mapping[str, Any]) -> str:
    """'-21.0% vs the NF4 base 37.96, -9.8% vs the fp32 base 33.2': a perplexity's change against both
    bases of round 0, as every summary prints it ('' before round 0 is known)."""
    if not isinstance(m, RoundMetrics):  # a round the loop is still building may have no number yet
        m = RoundMetrics.from_json({"round": 0, **m})
    if m.vs_base is None:
        return ""
    quant = m.quant if m.quant is not None else "quantized"
    text = f"{m.vs_base:+.1%} vs the {base_name(quant)} base {m.base_ppl:.2f}"
    if m.vs_full_base is not None:
        full = m.full_base if m.full_base is not None else "full-precision"
        text += f", {m.vs_full_base:+.1%} vs the {full} base {m.full_base_ppl:.2f}"
    return text


FULL_QUANT = {"fp32": "none", "bf16": "bf16"}  # --full-base as a --quant


def full_base_round(cfg: RunConfig, rnd: int, quant: str) -> bool:
    """Rounds that also evaluate on the unquantized base: 0 (what quantizing cost) and the last (what
    the adapter gives merged onto the full-precision base, fedpeft export's default); never when the
    devices' base (`quant`, resolved) is that base already."""
    full = FULL_QUANT.get(cfg.base.full_base)
    return full is not None and full != quant and rnd in (0, cfg.federation.rounds)


def add_changes(metrics: dict[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """This round's held-out perplexity against both bases of round 0: the quantized base the devices
    run (`vs_base`) and the unquantized one (`vs_full_base`, with `full_base_ppl`), so that no gain is
    reported only against a base that quantization made worse."""
    if not history or "eval_ppl" not in history[0] or "eval_ppl" not in metrics:
        return
    first = history[0]
    metrics.update({k: first[k] for k in ("quant", "full_base") if k in first})
    metrics["base_ppl"] = first["eval_ppl"]
    base_clients, mine = first.get("eval_per_client", {}), metrics.get("eval_per_client", {})
    sampled = bool(mine) and all("base_loss" in e for e in mine.values())
    if sampled:  # a sample: each client scored the base too
        metrics["base_ppl"] = _pooled_ppl(
            [{"loss": e["base_loss"], "tokens": e["tokens"]} for e in mine.values()]
        )
        metrics["base_clients"] = len(mine)
    elif base_clients and set(mine) < set(base_clients):  # a client did not answer: round 0 on the others
        metrics["base_ppl"] = _pooled_ppl([base_clients[u] for u in mine])
        metrics["base_clients"] = len(mine)
    metrics["vs_base"] = metrics["eval_ppl"] / metrics["base_ppl"] - 1
    if "full_eval_ppl" in metrics and mine and all("full_base_loss" in e for e in mine.values()):
        entries = [{"loss": e["full_base_loss"], "tokens": e["tokens"]} for e in mine.values()]
        metrics["full_base_ppl"] = _pooled_ppl(entries)
        metrics["vs_full_base"] = metrics["eval_ppl"] / metrics["full_base_ppl"] - 1
        return
    if "full_eval_ppl" not in first or sampled and "full_eval_ppl" not in metrics:
        return  # a sample compares with the unquantized base only where it was scored (round 0, the last)
    metrics["full_base_ppl"] = first["full_eval_ppl"]
    covered = [u for u, e in base_clients.items() if "full_ppl" in e]
    if len(covered) == len(base_clients) and "base_clients" not in metrics:
        metrics["vs_full_base"] = metrics["eval_ppl"] / first["full_eval_ppl"] - 1
        return
    if "base_clients" in metrics and set(mine) <= set(covered):  # a sample: both bases on its clients
        entries = [
            {"loss": math.log(base_clients[u]["full_ppl"]), "tokens": base_clients[u]["tokens"]} for u in mine
        ]
        metrics["full_base_ppl"] = _pooled_ppl(entries)
        metrics["vs_full_base"] = metrics["eval_ppl"] / metrics["full_base_ppl"] - 1
        return
    # some devices skipped the unquantized base (their --max-memory): compare on the clients that ran it
    mine = [metrics["eval_per_client"][u] for u in covered if u in metrics.get("eval_per_client", {})]
    tokens = sum(e["tokens"] for e in mine)
    if tokens:
        metrics["full_base_clients"] = len(mine)
        metrics["vs_full_base"] = (
            ppl(sum(e["loss"] * e["tokens"] for e in mine) / tokens) / first["full_eval_ppl"] - 1
        )


def _pooled_ppl(entries: Sequence[Mapping[str, Any]]) -> float:
    """The token-weighted perplexity of per-client entries ({loss, tokens})."""
    tokens = sum(e["tokens"] for e in entries)
    return ppl(sum(e["loss"] * e["tokens"] for e in entries) / max(tokens, 1))


EVAL_STREAM = 1_000_003  # the evaluation sample's seed offset: not the training sample's


def eval_clients(cfg: RunConfig, rnd: int, clients: Sequence[int]) -> list[int]:
    """The clients round `rnd` evaluates: none between --eval-every rounds (round 0 and the last round are
    always evaluated), otherwise a --fraction-evaluate share sampled from --seed and the round (at least
    one; a resumed run evaluates the same). The last round of a run that personalizes evaluates every
    client: each reports its personal adapter there."""
    f = cfg.federation
    if rnd % f.eval_every and rnd not in (0, f.rounds):
        return []
    if f.fraction_evaluate >= 1 or (rnd == f.rounds and strategy_for(cfg).personal):
        return list(clients)
    return [
        clients[i] for i in sample_clients(len(clients), f.fraction_evaluate, 1, f.seed + EVAL_STREAM, rnd)
    ]


def personal_entry(report: Mapping[str, Any], global_ppl: float) -> dict[str, Any]:
    """A client's personal report (fedpeft.device.runtime.Device.personalize) as its metrics entry: which adapter
    it kept and that adapter's perplexity. Raises KeyError, TypeError or ValueError when malformed."""
    p = dict(report)
    entry: dict[str, Any] = {
        "kept": str(p["kept"]),
        "note": str(p.get("note", "")),
        "personal_seconds": float(p["personal_seconds"]),
    }
    if "personal_eval_loss" in p:
        entry["personal_ppl"] = ppl(float(p["personal_eval_loss"]))
    personal_task = client_entry(p, "personal_task_")  # task data: the personal adapter's task scores
    if personal_task is not None:
        entry["personal_task"] = personal_task
    entry["kept_ppl"] = entry["personal_ppl"] if entry["kept"] == "personal" else global_ppl
    for key in ("val_loss_global", "val_loss_personal"):
        if key in p:
            entry[key] = float(p[key])
    # the personal adapter on the reference text (fedpeft.federation.forgetting)
    if "reference_loss_personal" in p:
        entry["personal_reference_ppl"] = ppl(float(p["reference_loss_personal"]))
        entry["forgets"] = bool(float(p.get("forgets", 0.0)))  # the device kept global: the personal forgot
    if "others_loss_global" in p and "personal_ppl" in entry:
        own = gain(entry["personal_ppl"], global_ppl)
        others = gain(ppl(float(p["others_loss_personal"])), ppl(float(p["others_loss_global"])))
        entry.update(
            own_gain=own, others_gain=others, others=int(p["others"]), specificity=specificity(own, others)
        )
    return entry


def personal_round(cfg: RunConfig, rnd: int) -> bool:
    """Whether round `rnd` evaluates personal adapters: fedsa and ditto hold them from their first sampled
    round on, so every round; finetune makes them at the federation's last round only."""
    return strategy_for(cfg).evaluates_personal(rnd, cfg.federation.rounds)


def add_base(metrics: dict[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """The round's change against round 0's bases (add_changes) and each client's base-model perplexity
    (round 0 evaluates the base with the adapter disabled). Adds the personalization summary when the
    round has personal figures."""
    add_changes(metrics, history)
    add_task_changes(metrics, history)
    if "eval_per_client" not in metrics:  # a round that evaluated no client (--eval-every)
        return
    base = history[0].get("eval_per_client", {}) if history else {}
    for user, entry in metrics["eval_per_client"].items():
        if "kept" in entry and user in base:
            entry["base_ppl"] = base[user]["ppl"]
    summary = summarize(metrics["eval_per_client"])
    if summary is not None and "quant" in metrics:
        summary["quant"] = metrics["quant"]  # every figure names the base it was measured on
    if summary is not None:
        metrics["personal"] = summary
