"""`fedpeft eval`: the base, any adapter fedpeft wrote (a run's global adapter, `fedpeft train`'s folder) and
users' personal adapters scored on task data with the federation's own metric code (fedpeft.federation.task_eval),
for held-out users or new data."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.atomic import atomic_write_bytes
from fedpeft.config.tree import BaseConfig, DataConfig
from fedpeft.data.blocks import task_kind, tokenize_user
from fedpeft.data.users import find_user, load_users
from fedpeft.errors import FedpeftError, TooLittleData
from fedpeft.federation.task_eval import client_entry, pooled
from fedpeft.personal.store import user_adapter
from fedpeft.training.task_metrics import score

log = logging.getLogger("fedpeft")
PERSONAL = "personal="


@dataclass(frozen=True)
class Source:
    label: str
    files: Any = None  # AdapterFiles, or None for the base alone
    store: Path | None = None  # personal=: a run folder or device store holding each user's adapters


def read_sources(specs: list[str]) -> list[Source]:
    """`base`, a run folder (its global adapter), an adapter folder, or personal=RUN_OR_STORE."""
    from fedpeft.model.adapters import read_adapter  # torch: off the CLI's start-up path

    out = []
    for spec in specs:
        if spec == "base":
            out.append(Source("base"))
        elif spec.startswith(PERSONAL):
            store = Path(spec[len(PERSONAL) :]).expanduser()
            if not store.is_dir():
                raise FedpeftError(f"{spec}: no such run folder or store")
            out.append(Source(spec, store=store))
        else:
            path = Path(spec).expanduser()
            folder = path / "global" if (path / "global").is_dir() else path
            out.append(Source(spec, files=read_adapter(folder)))
    return out


def user_tasks(data: DataConfig, tokenizer: Any, examples: str, only: list[str]) -> dict[str, Any]:
    """Each user's examples to score: the held-out tail a federation holds out (`held-out`), or all of
    them (`all`: new users, new data). Users with too few examples for a held-out part are left out."""
    from fedpeft.data.chat import task_eval  # torch: off the CLI's start-up path

    users = load_users(data)
    if only:
        users = [find_user(users, name) for name in only]
    kind = task_kind(data, users[0])
    if kind == "lm":
        raise FedpeftError(
            f"{data.data} is raw text: fedpeft eval scores task data (--task classify or generate)"
        )
    tasks = {}
    for u in users:
        if examples == "all":
            tasks[u.user] = task_eval(tokenizer, u.examples, kind, u.labels, data.block_size)
            continue
        try:
            tasks[u.user] = tokenize_user(u, tokenizer, data).task
        except TooLittleData as e:
            log.info("left out: %s", e)
    if not tasks:
        raise FedpeftError(
            f"no user in {data.data} has enough examples for a held-out part; try --examples all"
        )
    return tasks


def evaluate_sources(
    specs: list[str], data: DataConfig, examples: str, only: list[str], model: str | None,
    cache_dir: str | None, compute: str, batch_size: int = 8,
) -> dict[str, Any]:  # fmt: skip
    """{source: {"task": pooled figures, "users": {user: entry}}} for every source."""
    # torch, peft: off the CLI's start-up path
    from fedpeft.model.adapters import (
        adapter_off,
        base_model,
        check_fingerprint,
        inject,
        load_adapter_state,
        read_adapter,
    )
    from fedpeft.model.base import load_base

    sources = read_sources(specs)
    first = next((s.files for s in sources if s.files is not None), None)
    meta = first.meta if first is not None else {}
    base_cfg = BaseConfig(model=model or (base_model(meta) if meta else "default"),
                          quant=meta.get("quant", "auto"), cache_dir=cache_dir, compute_dtype=compute)  # fmt: skip
    base = load_base(base_cfg)
    tasks = user_tasks(data, base.tokenizer, examples, only)
    peft_model, injected = None, None
    results: dict[str, Any] = {}
    for src in sources:
        per_user: dict[str, Any] = {}
        for user, task in tasks.items():
            files = src.files
            if (
                src.store is not None
            ):  # the adapter this user keeps (personal or global), checked as export does
                try:
                    folder, _ = user_adapter(src.store, user, "kept")
                except FedpeftError:
                    continue
                files = read_adapter(folder)
            if files is None:
                model_now = peft_model or base.model
                ctx = adapter_off(peft_model) if peft_model is not None else contextlib.nullcontext()
            else:
                check_fingerprint(files.fingerprint, base, f"adapter {files.path}")
                if peft_model is None:
                    peft_model, injected = inject(base, files.adapter_config), files.adapter_config
                elif files.adapter_config != injected:  # another kind, rank or scaling: another model
                    raise FedpeftError(
                        f"{files.path} is another kind of adapter than the first one ({injected.kind}, r "
                        f"{injected.rank}): score adapters of different configurations in separate commands"
                    )
                load_adapter_state(peft_model, files.arrays, what=f"adapter {files.path}")
                model_now, ctx = peft_model, contextlib.nullcontext()
            with ctx:
                counts = score(model_now, base.tokenizer, task, base.compute, data.answer_tokens, batch_size)
            per_user[user] = client_entry(counts)
        if not per_user:
            raise FedpeftError(f"{src.label}: no user of {data.data} has an adapter there")
        results[src.label] = {"task": pooled(list(per_user.values())), "users": per_user}
    return results


def report(results: dict[str, Any]) -> str:
    """One line per source: its pooled figures and how many users and examples they cover."""
    lines = []
    for label, r in results.items():
        t = r["task"]
        if t["kind"] == "classify":
            figure = f"accuracy {t['accuracy']:.1%}, macro-F1 {t['macro_f1']:.3f}"
        else:
            figure = f"ROUGE-L {t['rouge_l']:.3f}, exact match {t['exact_match']:.1%}"
        lines.append(f"{label}: {figure} over {int(t['n'])} examples of {len(r['users'])} users")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(results, indent=2) + "\n").encode())
