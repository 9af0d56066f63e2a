"""`fedpeft generate`: one user's base, global and personal adapters continuing the same prompt."""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

from fedpeft.config.tree import BaseConfig
from fedpeft.errors import FedpeftError
from fedpeft.personal.store import GLOBAL, PERSONAL, find_store


def compare(
    source: Path,
    user: str,
    prompt: str,
    max_new_tokens: int,
    model: str | None,
    cache_dir: str | None,
    compute_dtype: str = "auto",
) -> str:
    """Greedy continuations of `prompt` by the base, the global and the personal adapter of `user` in a run
    folder or a device store, laid out side by side."""
    # torch, peft: off the CLI's start-up path
    from fedpeft.model.adapters import base_model, check_fingerprint, inject, load_adapter_state, read_adapter
    from fedpeft.model.base import load_base
    from fedpeft.training.local import generate

    if max_new_tokens <= 0:
        raise FedpeftError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if not prompt.strip():
        raise FedpeftError("--prompt is empty")
    store = find_store(source, user)
    adapters = {w: read_adapter(store.dir / w) for w in (GLOBAL, PERSONAL) if (store.dir / w).is_dir()}
    if not adapters:
        raise FedpeftError(f"user {store.user} has no adapters in {store.dir} yet")
    first = next(iter(adapters.values()))
    # the base an adapter names exactly, where one does (a federation's names only the source weights)
    own = next((f for f in adapters.values() if f.exact), first)
    base = load_base(
        BaseConfig(
            model=model or base_model(own.meta),
            quant=own.meta["quant"],
            cache_dir=cache_dir,
            compute_dtype=compute_dtype,
        )
    )
    for files in adapters.values():
        check_fingerprint(files.fingerprint, base, f"adapter {files.path}")
    peft_model = inject(base, first.adapter_config)
    kept = (store.choice() or {}).get("use")
    outputs = []
    with peft_model.disable_adapter():
        outputs.append(("base", generate(peft_model, base.tokenizer, prompt, max_new_tokens, base.compute)))
    for which, files in adapters.items():
        load_adapter_state(peft_model, files.arrays, what=f"adapter {files.path}")
        label = f"{which} (round {files.meta.get('round')}{', kept' if which == kept else ''})"
        outputs.append((label, generate(peft_model, base.tokenizer, prompt, max_new_tokens, base.compute)))
    return f"user {store.user}, prompt: {prompt!r}\n" + side_by_side(outputs)


def side_by_side(outputs: list[tuple[str, str]]) -> str:
    """Columns on a terminal wide enough for three readable ones; labelled blocks otherwise (pipes, files)."""
    width = shutil.get_terminal_size((0, 0)).columns
    col = (width - 3 * (len(outputs) - 1)) // len(outputs)
    if not sys.stdout.isatty() or col < 36:
        return "".join(f"\n--- {label} ---\n{text.strip()}\n" for label, text in outputs)
    cols = [[label.ljust(col), "-" * col, *textwrap.wrap(text.strip(), col)] for label, text in outputs]
    rows = max(len(c) for c in cols)
    return "\n" + "\n".join(
        " | ".join((c[i] if i < len(c) else "").ljust(col) for c in cols) for i in range(rows)
    )
