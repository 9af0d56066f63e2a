"""The per-user store of personal adapters, which never leave the device. One folder per user:
ROOT/<user>/personal/ and ROOT/<user>/global/ (PEFT folders with fedpeft.json, tagged with the base
fingerprint and the global round) and ROOT/<user>/choice.json (which of the two the user keeps, with the
losses that decided it). This module imports no torch: the server and the commands that serve or export a
user's adapter read the store with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.atomic import atomic_write_json
from fedpeft.data.users import _slug
from fedpeft.errors import FedpeftError
from fedpeft.model.adapter_files import META_FILE, adapter_meta, write_adapter_dir
from fedpeft.personal.strategies import strategy_for

if TYPE_CHECKING:
    from fedpeft.config.tree import AdapterConfig, RunConfig

PERSONAL, GLOBAL = "personal", "global"
CHOICE_FILE = "choice.json"


def check_store(cfg: RunConfig) -> None:
    """A personal store that cannot be a folder, as a one-line error before anything starts (the
    combinations of methods and adapters are fedpeft.config.tree.validate's)."""
    p = cfg.personal
    if strategy_for(cfg).personal and p.store and Path(p.store).exists() and not Path(p.store).is_dir():
        raise FedpeftError(f"--store is a file, not a folder: {p.store}")


def choose(val_global: float, val_personal: float) -> str:
    """Keep the personal adapter only if it is better on the validation part (ties keep the global one)."""
    return PERSONAL if val_personal < val_global else GLOBAL


class PersonalStore:
    """One user's folder of the store. `check` refuses a store made for another base or adapter schema
    before anything is written, so such a store is never overwritten."""

    def __init__(self, root: str | Path, user: str) -> None:
        self.dir = Path(root).expanduser() / user
        self.user = user

    def _meta(self, which: str) -> dict[str, Any] | None:
        path = self.dir / which / META_FILE
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FedpeftError(f"unreadable personal store {path}: {e}; left untouched") from None

    def check(self, fingerprint: str, schema: list[list[Any]]) -> None:
        for which in (PERSONAL, GLOBAL):
            meta = self._meta(which)
            if meta is None:
                continue
            where = self.dir / which
            if meta.get("base_fingerprint") != fingerprint:
                raise FedpeftError(
                    f"personal store {where} was made for another base (fingerprint "
                    f"{str(meta.get('base_fingerprint'))[:12]}, this base is {fingerprint[:12]}); "
                    "left untouched: move it away or use another --store"
                )
            if meta.get("schema") != schema:
                raise FedpeftError(
                    f"personal store {where} holds another adapter schema (other adapter, rank or "
                    "targets); left untouched: move it away or use another --store"
                )

    def load(self, which: str = PERSONAL) -> dict[str, np.ndarray] | None:
        """The stored arrays (validated as any adapter folder is), or None if there are none yet."""
        from fedpeft.model.adapters import read_adapter  # device side only: it imports torch

        if self._meta(which) is None:
            return None
        return read_adapter(self.dir / which).arrays

    def save(
        self,
        which: str,
        arrays: dict[str, np.ndarray],
        peft_config: dict[str, Any],
        base: dict[str, str],
        adapter: AdapterConfig,
        global_round: int,
        method: str,
    ) -> Path:
        meta = adapter_meta(
            base["fingerprint"],
            base["path"],
            base["quant"],
            adapter,
            arrays,
            base={k: v for k, v in base.items() if k != "path"},
            round=global_round,
            personal={"user": self.user, "kind": which, "method": method, "global_round": global_round},
        )
        try:
            return write_adapter_dir(self.dir / which, arrays, peft_config, meta)
        except OSError as e:  # full disk, no permission: the device says why in one line
            raise FedpeftError(f"cannot write the personal store {self.dir / which}: {e.strerror}") from None

    def save_choice(self, doc: dict[str, Any]) -> None:
        try:
            atomic_write_json(self.dir / CHOICE_FILE, doc)
        except OSError as e:
            raise FedpeftError(f"cannot write the personal store {self.dir}: {e.strerror}") from None

    def choice(self) -> dict[str, Any] | None:
        path = self.dir / CHOICE_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise FedpeftError(f"unreadable {path}: {e}") from None
        if not isinstance(doc, dict):
            raise FedpeftError(f"unreadable {path}: not a JSON object")
        return doc


def find_store(src: str | Path, user: str) -> PersonalStore:
    """A user's store from a run folder (RUN/personal/<user>), a device store (STORE/personal/<user>) or
    the store root itself (ROOT/<user>)."""
    src = Path(src).expanduser()
    for root in (src / "personal", src):
        for name in (user, _slug(user)):  # "Barack Obama" finds barack-obama, the id the data gives that user
            if (root / name).is_dir():
                return PersonalStore(root, name)
    roots = [r for r in (src / "personal", src) if r.is_dir()]
    known = sorted(p.name for r in roots for p in r.iterdir() if (p / CHOICE_FILE).is_file())
    hint = f" (users there: {', '.join(known[:5])}{', ...' if len(known) > 5 else ''})" if known else ""
    raise FedpeftError(f"no personal adapter for user {user!r} under {src}{hint}")


def user_adapter(src: str | Path, user: str, which: str) -> tuple[Path, str]:
    """The folder of a user's adapter in a personal store: `which` is personal, global, or kept (the one the
    device chose); and a phrase saying which it is, for the user."""
    store = find_store(src, user)
    choice = store.choice() or {}
    if which == "kept":
        which = choice.get("use", PERSONAL if (store.dir / PERSONAL).is_dir() else GLOBAL)
        if which not in (PERSONAL, GLOBAL):  # a path here would serve or export any folder as this user's
            raise FedpeftError(
                f"{store.dir / CHOICE_FILE}: 'use' must be {PERSONAL} or {GLOBAL}, got {which!r}"
            )
        why = f"kept by the device after round {choice.get('global_round')}" if choice else "kept"
    else:
        why = "as asked"
    if not (store.dir / which).is_dir():
        raise FedpeftError(f"user {store.user} has no {which} adapter in {store.dir}")
    note = f"; {choice['note']}" if choice.get("note") else ""
    return store.dir / which, f"{store.user}'s {which} adapter ({why}{note})"
