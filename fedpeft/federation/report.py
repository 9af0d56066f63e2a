"""Figures people look at rather than read: written as PNG bytes so callers can store them atomically."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from fedpeft.errors import require
from fedpeft.federation.metrics import RoundMetrics, TaskMetrics, base_name
from fedpeft.federation.task_eval import HEADLINE, headline, pooled


def train_loss_png(losses: list[float], eval_before: float, eval_after: float, title: str) -> bytes:
    """Training loss per step, with the held-out loss before and after as horizontal lines."""
    require("matplotlib", "plot", "a plot")  # matplotlib: only drawing needs it; not in a device's install
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and edge devices
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, label="train loss (per step)", color="tab:blue", alpha=0.8)
    ax.axhline(eval_before, color="tab:gray", linestyle="--", label=f"held-out before: {eval_before:.3f}")
    ax.axhline(eval_after, color="tab:green", linestyle="--", label=f"held-out after: {eval_after:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def federation_png(history: Sequence[RoundMetrics]) -> bytes:
    """Per round: held-out loss of the global adapter (token-weighted over all clients) and the mean
    local training loss; held-out perplexity with the per-client spread."""
    require("matplotlib", "plot", "a plot")  # matplotlib: see train_loss_png
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [h for h in history if h.eval_ppl is not None]  # --eval-every skips some
    personal = next((h for h in reversed(evaluated) if h.personal is not None), None)
    if personal is None:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    else:
        fig, axes = plt.subplots(2, 2, figsize=(10, 7.6), dpi=110, gridspec_kw={"height_ratios": [1, 1.1]})
        ax1, ax2 = axes[0]
        gs = axes[1, 0].get_gridspec()
        axes[1, 0].remove()
        axes[1, 1].remove()
        _per_client_bars(fig.add_subplot(gs[1, :]), personal)
    _loss_panel(ax1, evaluated, history)
    first = evaluated[0]
    if first.task is not None:  # task data: the task's own figure, not the answers' perplexity
        _task_panel(ax2, evaluated)
    else:
        _ppl_panel(ax2, evaluated)
    kept = [(h.round, _kept_ppl(h)) for h in evaluated if h.personal is not None and h.task is None]
    if kept:
        ax2.plot(*zip(*kept, strict=True), "D-", color="tab:orange", label="adapters the users keep")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax2.set_xlabel("round")
    if first.task is None:
        ax2.set_ylabel("perplexity")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    return _png(fig)


def _loss_panel(ax, evaluated: list[RoundMetrics], history: Sequence[RoundMetrics]) -> None:
    """The global adapter's held-out loss where evaluated, the clients' training loss where trained."""
    ax.plot(
        [h.round for h in evaluated], [h.eval_loss for h in evaluated], "o-", label="global adapter, held-out"
    )
    trained = [h for h in history if h.train_loss is not None]
    ax.plot(
        [h.round for h in trained], [h.train_loss for h in trained], "s--", label="clients, local training"
    )
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy (nats/token)")
    _epsilon(ax, history)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _ppl_panel(ax, history: list[RoundMetrics]) -> None:
    """Held-out perplexity on the devices' base, on the unquantized base where measured, the per-client
    spread, and the reference text where clients scored it."""
    first, rounds = history[0], [h.round for h in history]
    on = f"on the {base_name(first.quant)} base" if first.quant is not None else "all held-out tokens"
    ax.plot(rounds, [h.eval_ppl for h in history], "o-", color="tab:green", label=f"global adapter {on}")
    if first.full_eval_ppl is not None:  # the gain against the unquantized base, not only the quantized one
        full = first.full_base if first.full_base is not None else "full-precision"
        ax.axhline(first.full_eval_ppl, color="black", ls=":", lw=1, label=f"the {full} base")
        later = [(h.round, h.full_eval_ppl) for h in history[1:] if h.full_eval_ppl is not None]
        if later:
            ax.plot(*zip(*later, strict=True), "^", color="black", label=f"global adapter on the {full} base")
    # a round in which no client could evaluate has no spread to draw (its failures are in the log)
    spread = [(h.round, [c.ppl for c in h.clients.values()]) for h in history]
    spread = [(r, min(p), max(p)) for r, p in spread if p]
    if spread:
        r, lo, hi = zip(*spread, strict=True)
        ax.fill_between(r, lo, hi, color="tab:green", alpha=0.15, label="per-client min-max")
    reference = [(h.round, h.reference_ppl) for h in history if h.reference_ppl is not None]
    if reference:  # general text nobody owns: what the adapter costs the base's general ability
        ax.plot(
            *zip(*reference, strict=True), "v-", color="tab:purple", label="global adapter, reference text"
        )
        base = first.base_reference_ppl if first.base_reference_ppl is not None else reference[0][1]
        ax.axhline(base, color="tab:purple", ls=":", lw=1, label="the base, reference text")


def _task_panel(ax, history: list[RoundMetrics]) -> None:
    """The global adapter's task figure per round, the zero-shot base as a line, the per-client spread,
    and the personal adapters' pooled figure where a round has them."""
    rows = [h for h in history if h.task]
    kind = rows[0].task.kind
    rows = [h for h in rows if h.task.kind == kind]
    key = HEADLINE[kind]
    name = {"accuracy": "accuracy", "rouge_l": "ROUGE-L"}[key]
    on = f" on the {base_name(history[0].quant)} base" if history[0].quant is not None else ""
    ax.plot([h.round for h in rows], [_headline(h.task) for h in rows], "o-", color="tab:green",
            label=f"global adapter{on}")  # fmt: skip
    ax.axhline(_headline(rows[0].task), color="tab:gray", ls=":", lw=1, label="the base, zero-shot")
    spread = [(h.round, [c.task[key] for c in h.clients.values() if key in (c.task or {})]) for h in rows]
    spread = [(r, min(v), max(v)) for r, v in spread if v]
    if spread:
        r, lo, hi = zip(*spread, strict=True)
        ax.fill_between(r, lo, hi, color="tab:green", alpha=0.15, label="per-client min-max")
    personal = [(h.round, pooled([c.personal_task for c in h.clients.values() if c.personal_task is not None]))
                for h in rows]  # fmt: skip
    personal = [(r, headline(p)) for r, p in personal if p and p["kind"] == kind]
    if personal:
        ax.plot(*zip(*personal, strict=True), "D", color="tab:orange", label="personal adapters")
    ax.set_ylabel(f"held-out {name}")


def _headline(task: TaskMetrics) -> float:
    """The task's figure a plot draws: accuracy, or ROUGE-L (fedpeft.federation.task_eval.HEADLINE)."""
    return float(getattr(task, HEADLINE[task.kind]))


def _epsilon(ax, history: Sequence[RoundMetrics]) -> None:
    """Under DP, the privacy spent so far on a second axis (round 0: nothing yet)."""
    spent = [(0, 0.0)] + [(h.round, h.dp.epsilon) for h in history if h.dp]
    if len(spent) == 1:
        return
    delta = next(h.dp.delta for h in history if h.dp)
    right = ax.twinx()
    right.plot(*zip(*spent, strict=True), "x:", color="tab:purple", label="ε spent")
    right.set_ylabel(f"ε spent (δ = {delta:.0e})", color="tab:purple")
    right.set_ylim(bottom=0)
    right.legend(fontsize=8, loc="center right")


def _per_client_bars(ax, h: RoundMetrics) -> None:
    """Per user after round h: base, global and personal held-out perplexity; the kept one outlined."""
    users = sorted(h.clients)
    rows = [h.clients[u] for u in users]
    x = list(range(len(users)))
    width = 0.27
    series = (
        ("base", "base_ppl", "tab:gray"),
        ("global", "ppl", "tab:blue"),
        ("personal", "personal_ppl", "tab:orange"),
    )
    for i, (label, key, color) in enumerate(series):
        values = [getattr(r, key) or 0.0 for r in rows]
        bars = ax.bar([p + (i - 1) * width for p in x], values, width, label=label, color=color)
        for bar, r in zip(bars, rows, strict=True):
            if label == r.kept:
                bar.set_edgecolor("black")
                bar.set_linewidth(1.5)
    s = h.personal
    specific = (
        f"; specificity median {s['specificity_median']:.1f} (own {s['own_gain_median']:+.1%}, "
        f"others {s['others_gain_median']:+.1%})"
        if "specificity_median" in s
        else ""
    )
    ax.set_title(
        f"round {h.round}: personal beats global for {s['beats_global']}/{s['users']} users "
        f"(median {s['median_change']:+.1%}){specific}; outlined: the adapter each user keeps",
        fontsize=9,
    )
    shown = [v for r in rows for k in ("base_ppl", "ppl", "personal_ppl") if (v := getattr(r, k))]
    ax.set_ylim(0.8 * min(shown), 1.05 * max(shown))  # differences of a few percent stay visible
    ax.set_xticks(x)
    ax.set_xticklabels(users, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(alpha=0.3, axis="y")


def _kept_ppl(h: RoundMetrics) -> float:
    """Perplexity over all held-out tokens when every user runs the adapter it keeps."""
    rows = list(h.clients.values())
    nll = sum(math.log(r.kept_ppl if r.kept_ppl is not None else r.ppl) * r.tokens for r in rows)
    return math.exp(nll / max(sum(r.tokens for r in rows), 1))


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (callers store them atomically), closed so that a long run holds no figures."""
    import matplotlib.pyplot as plt  # matplotlib: only when a plot is drawn

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
