"""Figures people look at rather than read: written as PNG bytes so callers can store them atomically."""

from __future__ import annotations

import io


def train_loss_png(losses: list[float], eval_before: float, eval_after: float, title: str) -> bytes:
    """Training loss per step, with the held-out loss before and after as horizontal lines."""
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
