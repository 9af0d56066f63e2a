"""The personal adapters' figures pooled on the server: per user, the gain against the global adapter and
its specificity; over users, the summary a round's metrics carry under "personal", and its line."""

from __future__ import annotations

import statistics
from typing import Any

from fedpeft.federation.metrics import base_name
from fedpeft.federation.task_eval import headline, pooled
from fedpeft.personal.store import PERSONAL


def relative_change(personal_ppl: float, global_ppl: float) -> float:
    return personal_ppl / global_ppl - 1.0


def gain(personal_ppl: float, global_ppl: float) -> float:
    """How much the personal adapter lowers perplexity against the global one on some text (0.05: 5%)."""
    return -relative_change(personal_ppl, global_ppl)


SPECIFICITY_FLOOR = 0.001  # others' gain below 0.1% (or a loss) counts as 0.1%: the ratio stays finite


def specificity(own_gain: float, others_gain: float) -> float:
    """Own gain over the mean gain on other users' text: 1 means extra generic training that helps
    everyone alike, >= 2 an adapter that is about its own user, 0 one that does not help its own user."""
    return max(own_gain, 0.0) / max(others_gain, SPECIFICITY_FLOOR)


def summarize(per_client: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """For the users with a personal evaluation: how many the personal adapter beats the global one for,
    the median and worst relative perplexity change, and which adapter each user kept."""
    rows = {u: c for u, c in per_client.items() if c.get("personal_ppl") is not None}
    if not rows:
        return None
    changes = {u: relative_change(c["personal_ppl"], c["ppl"]) for u, c in rows.items()}
    return {
        "users": len(rows),
        "beats_global": sum(ch < 0 for ch in changes.values()),
        "median_change": statistics.median(changes.values()),
        "worst_change": max(changes.values()),
        "worst_user": max(changes, key=lambda u: changes[u]),
        "kept_personal": sum(c["kept"] == PERSONAL for c in rows.values()),
        "kept_change_median": statistics.median(
            relative_change(c["kept_ppl"], c["ppl"]) for c in rows.values()
        ),
        "kept_change_worst": max(relative_change(c["kept_ppl"], c["ppl"]) for c in rows.values()),
        "without_personal": sorted(u for u, c in per_client.items() if "kept" in c and u not in rows),
        "no_validation": sorted(u for u, c in rows.items() if c.get("note", "").startswith("too little")),
        **_specificity_summary(rows),
        **_reference_summary(rows),
        **_task_summary(rows),
    }


def _task_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Task data: for how many users the personal adapter scores at least as well as the global one on
    their held-out examples (accuracy or ROUGE-L), and both pooled over those users."""
    both = {u: c for u, c in rows.items() if c.get("task") and c.get("personal_task")}
    if not both:
        return {}
    return {
        "task_users": len(both),
        "task_at_least_global": sum(
            headline(c["personal_task"]) >= headline(c["task"]) for c in both.values()
        ),
        "task_global": headline(pooled([c["task"] for c in both.values()])),
        "task_personal": headline(pooled([c["personal_task"] for c in both.values()])),
        "task_metric": {"classify": "accuracy", "generate": "ROUGE-L"}[
            next(iter(both.values()))["task"]["kind"]
        ],
    }


def _reference_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The personal adapters on the reference text (fedpeft.federation.forgetting): their median perplexity, and how
    many a device kept out for forgetting."""
    scored = [c["personal_reference_ppl"] for c in rows.values() if "personal_reference_ppl" in c]
    if not scored:
        return {}
    return {
        "personal_reference_ppl_median": statistics.median(scored),
        "forgetting_kept_global": sum(bool(c.get("forgets")) for c in rows.values()),
    }


def _specificity_summary(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    scored = [c for c in rows.values() if "specificity" in c]
    if not scored:
        return {}
    return {
        "specificity_median": statistics.median(c["specificity"] for c in scored),
        "own_gain_median": statistics.median(c["own_gain"] for c in scored),
        "others_gain_median": statistics.median(c["others_gain"] for c in scored),
        "specificity_users": len(scored),
    }


def summary_line(s: dict[str, Any], method: str) -> str:
    """The personalization summary (fedpeft.federation.personal_summary.summarize) as the round line and the run's
    end print it; `method` as method_label names it."""
    line = (
        f"personal ({method}) beats global for {s['beats_global']}/{s['users']} users: median "
        f"{s['median_change']:+.1%}, worst {s['worst_change']:+.1%} ({s['worst_user']}) in held-out perplexity"
        f"{' on the ' + base_name(s['quant']) + ' base' if 'quant' in s else ''}; "
        f"kept personal for {s['kept_personal']}/{s['users']} (kept vs global: median "
        f"{s['kept_change_median']:+.1%}, worst {s['kept_change_worst']:+.1%})"
    )
    if "specificity_median" in s:
        line += (
            f"; specificity median {s['specificity_median']:.2f} (gain on its own user's text "
            f"{s['own_gain_median']:+.1%}, on other users' {s['others_gain_median']:+.1%})"
        )
    if "personal_reference_ppl_median" in s:
        line += f"; reference text ppl median {s['personal_reference_ppl_median']:.2f}"
        if s["forgetting_kept_global"]:
            line += f" ({s['forgetting_kept_global']} kept global: their personal adapter forgets)"
    if "task_users" in s:
        line += (
            f"; {s['task_metric']} at least the global adapter's for {s['task_at_least_global']}/{s['task_users']} "
            f"users (pooled: personal {s['task_personal']:.3f}, global {s['task_global']:.3f})"
        )
    if s["no_validation"]:
        line += f"; {len(s['no_validation'])} with too little text for a validation part keep global"
    if s["without_personal"]:
        line += f"; {len(s['without_personal'])} not sampled yet (no personal adapter)"
    return line
