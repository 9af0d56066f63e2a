"""Personal adapters that never leave the device: the per-user store, the methods' shared/personal split,
the validation part that decides between global and personal, and the per-user summary.

Methods (their training runs in fedpeft.device.runtime):
- finetune: the latest global adapter plus a few local steps, made at the federation's last evaluation,
  by default keeping only the part of their change that is specific to the user (specific_change);
- fedsa: FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
  ICLR 2025): LoRA A is shared and aggregated, B never leaves the device. Alone, the global adapter
  (A with B at its zero init) computes exactly the base model;
- ditto: Ditto (Li et al., ICML 2021): the global adapter trains as usual, and each time a client is
  sampled it also trains its personal adapter v on lam/2 ||v - w||^2 + its loss, w the global adapter.

Store, one folder per user: ROOT/<user>/personal/ and ROOT/<user>/global/ (PEFT folders with fedpeft.json,
tagged with the base fingerprint and the global round) and ROOT/<user>/choice.json (which of the two the
user keeps, with the losses that decided it). This module imports no torch: the server summarizes with it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.atomic import atomic_write_json
from fedpeft.config.tree import AdapterConfig, PersonalConfig, RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.adapter_files import META_FILE, adapter_meta, write_adapter_dir

if TYPE_CHECKING:
    import torch

    from fedpeft.data.users import UserData

PERSONAL, GLOBAL = "personal", "global"
CHOICE_FILE = "choice.json"


def check_store(cfg: RunConfig) -> None:
    """A personal store that cannot be a folder, as a one-line error before anything starts (the
    combinations of methods and adapters are fedpeft.config.tree.validate's)."""
    p = cfg.personal
    if p.method != "none" and p.store and Path(p.store).exists() and not Path(p.store).is_dir():
        raise FedpeftError(f"--store is a file, not a folder: {p.store}")


def shared_keys(names: list[str], lora_mode: str, method: str) -> list[str]:
    """The adapter tensors that clients train and exchange: all of them; LoRA B only under FFA-LoRA (A stays
    at the seeded init every client builds identically); LoRA A only under FedSA (B is personal)."""
    if lora_mode == "ffa":
        return [n for n in names if ".lora_B." in n]
    if method == "fedsa":
        return [n for n in names if ".lora_A." in n]
    return list(names)


def personal_seed(seed: int, rnd: int, client: int) -> int:
    """Seeds personal training apart from the client's federated training of the same round."""
    return int(np.random.default_rng([seed, rnd, client, 1]).integers(2**31 - 1))


def split_validation(data: UserData, fraction: float, min_tokens: int) -> tuple[UserData, list[torch.Tensor]]:
    """The tail `fraction` of a user's training blocks becomes the validation part (time order, as with the
    held-out part); it is no longer trained on. Too little text for `min_tokens`, or nothing left to
    train on: no validation part (the user then keeps the global adapter)."""
    from dataclasses import replace

    n = max(1, round(len(data.train) * fraction))
    val = data.train[-n:]
    if len(data.train) - n < 1 or sum(len(b) for b in val) < min_tokens:
        return data, []
    return replace(data, train=data.train[:-n]), val


def specific_change(
    personal: dict[str, np.ndarray], global_: dict[str, np.ndarray], init: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """finetune's personal adapter with only what is specific to its user (--personal-change specific).
    Tensor by tensor, the personal steps' change d = personal - global loses its component along
    v = global - init, the direction in which the federation moved the adapter from the init every client
    builds identically: personal' = global + d - (<d, v> / <v, v>) v. That direction is what all users'
    text shares, so steps along it help every user alike. A tensor the federation has not moved keeps its
    whole change. Needs nothing beyond the device's own global adapter: no server input to trust."""
    out = {}
    for name, p in personal.items():
        g = global_[name]
        d = p.astype(np.float64) - g
        v = g.astype(np.float64) - init[name]
        vv = float(np.vdot(v, v))
        if vv > 0.0:
            d -= (float(np.vdot(d, v)) / vv) * v
        out[name] = (g + d).astype(p.dtype)
    return out


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
    from fedpeft.data.users import _slug

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


# --- reports (server side) --------------------------------------------------------------------------


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
    from fedpeft.federation.task_eval import headline, pooled

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


def method_label(personal: PersonalConfig) -> str:
    """The method as the summary line names it: finetune says which part of its change it keeps."""
    if personal.method == "finetune":
        return f"finetune, {'specific' if personal.change == 'specific' else 'whole'} change"
    return personal.method


def summary_line(s: dict[str, Any], method: str) -> str:
    from fedpeft.federation.evaluation import base_name

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
