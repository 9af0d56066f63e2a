"""Which adapters `fedpeft serve` offers, by the names the API's `model` field uses.

- a run folder: `global` (RUN/global) and `personal/<user>` for every user of RUN/personal, the adapter that
  user's device kept (personal or global, choice.json);
- a device store (`fedpeft client --store`): `personal/<user>` for each of its users, and `global` (their
  latest global copy) when no run folder gives one;
- `--adapter NAME=PATH`: any adapter folder fedpeft wrote (or exported).

Every adapter is read and checked (schema against its own metadata) before the base loads, and all of them
must come from one base (one fingerprint): the server holds one base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedpeft.errors import FedpeftError
from fedpeft.model.adapters import AdapterFiles, read_adapter
from fedpeft.model.multi import PER_ROW
from fedpeft.personal.store import CHOICE_FILE, GLOBAL, PERSONAL, user_adapter

BASE = "base"  # the model name that means no adapter
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


@dataclass(frozen=True)
class Entry:
    name: str
    files: AdapterFiles
    origin: str  # where it came from, in words (the start-up listing)

    @property
    def kind(self) -> str:
        return self.files.adapter_config.kind

    @property
    def round(self) -> int | None:
        return self.files.meta.get("round")


def _is_adapter(path: Path) -> bool:
    return (path / "fedpeft.json").is_file()


def _store_users(root: Path) -> list[Path]:
    """The user folders under a store root: those with a choice or one of the two adapters."""
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir()
        and ((p / CHOICE_FILE).is_file() or _is_adapter(p / PERSONAL) or _is_adapter(p / GLOBAL))
    )


def _from_source(src: Path) -> list[Entry]:
    if not src.is_dir():
        raise FedpeftError(f"no such folder: {src}")
    if _is_adapter(src):
        return [Entry(src.name, read_adapter(src), f"adapter folder {src}")]
    entries = []
    if _is_adapter(src / GLOBAL):
        entries.append(Entry(GLOBAL, read_adapter(src / GLOBAL), f"global adapter of {src}"))
    users = _store_users(src / PERSONAL) or _store_users(src)
    for user_dir in users:
        path, why = user_adapter(user_dir.parent, user_dir.name, "kept")
        entries.append(Entry(f"{PERSONAL}/{user_dir.name}", read_adapter(path), why))
    if users and not any(e.name == GLOBAL for e in entries):  # a device store: its users' global copies
        copies = [u / GLOBAL for u in users if _is_adapter(u / GLOBAL)]
        if copies:
            newest = max((read_adapter(c) for c in copies), key=lambda f: f.meta.get("round") or -1)
            entries.append(
                Entry(GLOBAL, newest, f"latest global copy in {src} (round {newest.meta.get('round')})")
            )
    if not entries:
        raise FedpeftError(
            f"nothing to serve in {src}: not a run folder (global/, personal/), a device store or an adapter "
            "folder"
        )
    return entries


def _named(spec: str) -> Entry:
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise FedpeftError(f"--adapter wants NAME=PATH, got {spec!r}")
    check_name(name)
    return Entry(name, read_adapter(Path(path).expanduser()), f"--adapter {spec}")


def check_name(name: str) -> None:
    if not NAME.fullmatch(name) or name == BASE:
        raise FedpeftError(
            f"adapter name {name!r}: use letters, digits and . _ / - (not {BASE!r}, which is the base itself)"
        )


def base_entry(entries: list[Entry]) -> Entry:
    """The adapter whose base the server loads: one that names its exact quantized base, else the first (a
    federation's global adapter names only the source weights, which every quantization of them serves)."""
    return next((e for e in entries if e.files.exact), entries[0])


def discover(sources: list[str], named: list[str]) -> list[Entry]:
    """Every adapter to serve, in a stable order (sources as given, then --adapter); one base for all."""
    entries = [e for s in sources for e in _from_source(Path(s).expanduser())] + [_named(s) for s in named]
    if not entries:
        raise FedpeftError("nothing to serve: give a run folder, a device store or --adapter NAME=PATH")
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.name in seen:
            raise FedpeftError(
                f"two adapters are named {e.name!r} ({seen[e.name].origin}; {e.origin}): name one with "
                "--adapter NAME=PATH"
            )
        seen[e.name] = e
    # one base for all: the same source weights, and one quantization of them where an adapter names its exact
    # base (a federation's global adapter names the source, which any quantization of it serves)
    first, exact = entries[0], base_entry(entries)
    for e in entries[1:]:
        if e.files.source != first.files.source or (
            e.files.exact and e.files.fingerprint != exact.files.fingerprint
        ):
            raise FedpeftError(
                f"adapter {e.name} ({e.files.path}) was trained on another base than "
                f"{(first if e.files.source != first.files.source else exact).name} (fingerprint "
                f"{e.files.fingerprint[:12]} vs {first.files.fingerprint[:12]}); one server serves one base"
            )
    kinds = sorted({e.kind for e in entries})
    # LoRA and IA3 mix in one batch (fedpeft/model/multi.py); prompt and prefix tuning go through peft's model,
    # which holds one type of adapter
    if len(kinds) > 1 and set(kinds) - set(PER_ROW):
        raise FedpeftError(
            f"adapters of several types ({', '.join(kinds)}): LoRA and IA3 share a server, prompt and prefix "
            "tuning, VeRA and DoRA each need their own"
        )
    return entries
