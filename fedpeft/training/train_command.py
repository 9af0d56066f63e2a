"""`fedpeft train`: fine-tune one adapter on one user's text (or everyone's: the centralized baseline)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Any

from fedpeft.config.tree import RunConfig
from fedpeft.data.blocks import load_user_data
from fedpeft.errors import FedpeftError
from fedpeft.federation.evaluation import base_name
from fedpeft.federation.report import train_loss_png
from fedpeft.federation.task_eval import client_entry, headline, task_summary
from fedpeft.training.task_metrics import score

log = logging.getLogger("fedpeft")


def train_adapter(cfg: RunConfig, user: str, out: Path) -> str:
    """Train, evaluate before and after, save a PEFT folder with metrics.json and loss.png; returns the
    line to print. `out` is replaced only on success (fedpeft.model.adapters.save_adapter)."""
    # torch, peft: off the CLI's start-up path
    from fedpeft.model.adapters import adapter_state, inject, save_adapter
    from fedpeft.training.local import evaluate, train

    base, data = _load(cfg, user)
    model = inject(base, cfg.adapter)
    pad = base.tokenizer.pad_token_id
    held_out = functools.partial(
        evaluate, model, data.eval, pad, base.compute, cfg.train.eval_batch_size, progress=cfg.train.progress
    )
    before = held_out(desc="evaluating the base")
    task_before = _task(model, base, data, cfg, bare=True)
    lr = cfg.train.learning_rate(cfg.adapter.kind, cfg.adapter.freeze_a)
    result = train(model, data, cfg.train, lr, pad, base.compute, desc=f"train {cfg.adapter.kind}")
    after = held_out(desc="evaluating the adapter")
    task_after = _task(model, base, data, cfg)
    adapter_bytes = sum(v.nbytes for v in adapter_state(model).values())
    metrics = {
        "user": data.user,
        "adapter": cfg.adapter.kind,
        "quant": base.quant,
        "compute": base.precision.metrics(),
        "device": base.device,
        "steps": cfg.train.steps,
        "lr": lr,
        "eval_loss_before": before.loss,
        "eval_ppl_before": before.ppl,
        "eval_loss_after": after.loss,
        "eval_ppl_after": after.ppl,
        "eval_tokens": after.tokens,
        "train_losses": result.losses,
        "train_seconds": result.seconds,
        "train_tokens": result.tokens,
        "adapter_bytes": adapter_bytes,
        "base_bytes": base.nbytes,
        **({"task_before": task_before, "task_after": task_after} if task_after else {}),
    }
    title = f"{cfg.adapter.kind} on {data.user}, base {Path(str(base.path)).name} ({base.quant})"
    files = {"metrics.json": (json.dumps(metrics, indent=2) + "\n").encode()}
    try:
        files["loss.png"] = train_loss_png(result.losses, before.loss, after.loss, title)
    except FedpeftError as e:  # an install without the plot extra: metrics.json has the losses
        log.warning("loss.png is not drawn: %s", e)
    save_adapter(
        model,
        base,
        cfg.adapter,
        out,
        extra={"train": metrics | {"train_losses": None}},
        extra_files=files,
    )
    return _summary_line(metrics, base, out)


def _load(cfg: RunConfig, user: str) -> tuple[Any, Any]:
    """The base and the user's data (fedpeft.data.blocks.UserData), with what was loaded in the log."""
    from fedpeft.model.base import load_base  # torch: off the CLI's start-up path

    log.info("loading base %s (quant %s)", cfg.base.model, cfg.base.quant)
    base = load_base(cfg.base, cfg.train.max_memory)
    log.info("base on %s, %s", base.device, base.precision.line())
    data, skipped = load_user_data(cfg.data, base.tokenizer, user)
    if skipped:
        log.info("skipped %d users with too little text", skipped)
    log.info(
        "user %s: %d train blocks (%d tokens), %d held-out tokens",
        data.user,
        len(data.train),
        data.train_tokens,
        data.eval_tokens,
    )
    return base, data


def _summary_line(metrics: dict[str, Any], base: Any, out: Path) -> str:
    """The line `fedpeft train` prints, from the metrics it saved."""
    m = metrics
    task_before, task_after, adapter_bytes = m.get("task_before"), m.get("task_after"), m["adapter_bytes"]
    task = ""
    if task_after and task_before:
        task = task_summary({**task_after, "base": headline(task_before),
                             "vs_base": headline(task_after) - headline(task_before)}) + "; answer"  # fmt: skip
    return (
        f"{m['adapter']} adapter for {m['user']}: {task or 'held-out'} ppl {m['eval_ppl_before']:.2f} -> {m['eval_ppl_after']:.2f} "
        f"on the {base_name(m['quant'])} base ({base.compute} compute) after {m['steps']} steps ({m['train_seconds']:.1f} s); {adapter_bytes:,} bytes "
        f"({adapter_bytes / m['base_bytes']:.2%} of the base); saved to {out}"
    )


def _task(model: Any, base: Any, data: Any, cfg: RunConfig, bare: bool = False) -> dict[str, Any] | None:
    """Task data: the adapter's (`bare`: the base's zero-shot) scores on the held-out examples."""
    from fedpeft.model.adapters import adapter_off  # torch: off the CLI's start-up path

    if data.task is None:
        return None
    with adapter_off(model) if bare else contextlib.nullcontext():
        counts = score(
            model, base.tokenizer, data.task, base.compute, cfg.data.answer_tokens, cfg.train.eval_batch_size
        )
    return client_entry(counts)
