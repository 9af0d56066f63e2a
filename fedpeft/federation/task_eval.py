"""Task metrics of a federation: how the server pools what devices score on their held-out examples
(fedpeft.training.task_metrics.score).

A device sends counts, not rates (classify: examples, correct, and per label true positives, false
positives and false negatives; generate: examples and the sums of exact match and ROUGE-L), so the
server's pooled accuracy and macro-F1 are those of all clients' examples together. Every count comes from
a client and is checked before it is used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.federation.task_counts import ClassCounts

log = logging.getLogger("fedpeft")
PREFIX = "task_"
MAX_LABELS = 1000  # a client's report naming more labels than this is malformed
HEADLINE = {"classify": "accuracy", "generate": "rouge_l"}


def _count(m: Mapping[str, Any], key: str) -> float:
    v = float(m.get(key, 0.0))
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{key} = {v}")
    return v


def client_entry(m: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Any] | None:
    """One client's task report as its metrics entry (counts and rates), or None without one. Raises
    ValueError when malformed (the caller logs it and leaves the client's task figures out)."""
    if f"{prefix}n" not in m:
        return None
    n = _count(m, f"{prefix}n")
    if f"{prefix}correct" in m:
        ends = (
            k.rsplit("_", 1)[1] for k in m if k.startswith((f"{prefix}tp_", f"{prefix}fp_", f"{prefix}fn_"))
        )
        labels = 1 + max((int(e) for e in ends if e.isdigit()), default=-1)
        if labels > MAX_LABELS:
            raise ValueError(f"{labels} labels")
        counts = ClassCounts.from_metrics(m, labels, prefix)
        wrong = counts.n - counts.correct
        # one prediction and one gold label per example: the counts must tell the same story
        if (
            wrong < 0
            or sum(counts.tp) != counts.correct
            or sum(counts.fp) != wrong
            or sum(counts.fn) != wrong
        ):
            raise ValueError("the counts do not add up to the examples")
        return {"kind": "classify", **_classify_entry(counts)}
    em, rl = _count(m, f"{prefix}em"), _count(m, f"{prefix}rouge_l")
    if em > n or rl > n * (1 + 1e-6):
        raise ValueError("scores above the number of examples")
    return {"kind": "generate", "n": n, "em_sum": em, "rouge_l_sum": rl, "exact_match": em / max(n, 1),
            "rouge_l": rl / max(n, 1)}  # fmt: skip


def _classify_entry(c: ClassCounts) -> dict[str, Any]:
    return {"n": float(c.n), "correct": float(c.correct), "tp": list(c.tp), "fp": list(c.fp), "fn": list(c.fn),
            "accuracy": c.accuracy, "macro_f1": c.macro_f1}  # fmt: skip


def _counts(e: Mapping[str, Any]) -> ClassCounts:
    return ClassCounts(int(e["n"]), int(e["correct"]), [int(x) for x in e["tp"]], [int(x) for x in e["fp"]],
                       [int(x) for x in e["fn"]])  # fmt: skip


def pooled(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The round's task figures over clients' entries of one kind: {kind, n, accuracy, macro_f1} or
    {kind, n, exact_match, rouge_l}; {} without any."""
    entries = [e for e in entries if e]
    if not entries:
        return {}
    kind = task_kind(entries)
    entries = [e for e in entries if e["kind"] == kind]
    if kind == "classify":
        width = max(len(e["tp"]) for e in entries)
        total = ClassCounts(0, 0, [0] * width, [0] * width, [0] * width)
        for e in entries:
            c = _counts(e)
            pad = width - len(c.tp)
            total.merge(ClassCounts(c.n, c.correct, c.tp + [0] * pad, c.fp + [0] * pad, c.fn + [0] * pad))
        return {"kind": kind, "n": total.n, "accuracy": total.accuracy, "macro_f1": total.macro_f1}
    n = sum(e["n"] for e in entries)
    return {
        "kind": kind,
        "n": n,
        "exact_match": sum(e["em_sum"] for e in entries) / max(n, 1),
        "rouge_l": sum(e["rouge_l_sum"] for e in entries) / max(n, 1),
    }


def task_kind(entries: Sequence[Mapping[str, Any]]) -> str:
    """The kind most clients report: a client that reports another is not pooled with them."""
    kinds = [e["kind"] for e in entries]
    return max(sorted(set(kinds)), key=kinds.count)


def headline(task: Mapping[str, Any]) -> float:
    return float(task[HEADLINE[task["kind"]]])


def add_task_changes(metrics: dict[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """The round's task figure against round 0's base zero-shot on the same clients: `task.base` and
    `task.vs_base` (points of accuracy or of ROUGE-L)."""
    task = metrics.get("task")
    if not task or not history or "task" not in history[0]:
        return
    base_clients = history[0].get("eval_per_client", {})
    mine = [u for u in metrics.get("eval_per_client", {}) if "task" in base_clients.get(u, {})]
    base = pooled([base_clients[u]["task"] for u in mine]) if mine else history[0]["task"]
    if base and base["kind"] == task["kind"]:
        task["base"] = headline(base)
        task["vs_base"] = headline(task) - task["base"]


def task_text(m: Mapping[str, Any]) -> str:
    """'accuracy 81.2% (macro-F1 0.80; +12.0 points vs the base 69.2%) over 64 examples', or ''."""
    t = m.get("task")
    if not t:
        return ""
    if t["kind"] == "classify":
        text = f"accuracy {t['accuracy']:.1%} (macro-F1 {t['macro_f1']:.3f}"
    else:
        text = f"ROUGE-L {t['rouge_l']:.3f} (exact match {t['exact_match']:.1%}"
    if "vs_base" in t and t["kind"] == "classify":
        text += f"; {t['vs_base'] * 100:+.1f} points vs the base {t['base']:.1%}"
    elif "vs_base" in t:
        text += f"; {t['vs_base']:+.3f} vs the base {t['base']:.3f}"
    return text + f") over {int(t['n'])} examples"


def task_summary(t: Mapping[str, Any]) -> str:
    """'accuracy 69.2% -> 81.2% (+12.0 points, zero-shot base to global adapter)' for a run's last line."""
    name = {"classify": "accuracy", "generate": "ROUGE-L"}[t["kind"]]
    fmt = "{:.1%}" if t["kind"] == "classify" else "{:.3f}"
    now = fmt.format(headline(t))
    if "base" not in t:
        return f"{name} {now}"
    change = f"{t['vs_base'] * 100:+.1f} points" if t["kind"] == "classify" else f"{t['vs_base']:+.3f}"
    return f"{name} {fmt.format(t['base'])} -> {now} ({change} over the zero-shot base)"
