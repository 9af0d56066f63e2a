"""Personalization on the device, mixed into fedpeft.device.runtime.Device: each user's validation part and
store, the personal adapter's training (what a method's strategy asks through
fedpeft.personal.strategies.PersonalOps), and the last evaluation, which keeps the better of the global and
the personal adapter (choice.json). Nothing of a personal adapter goes into a reply: only scalars do.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.config.tree import AdapterConfig, RunConfig, client_lr
from fedpeft.errors import FedpeftError
from fedpeft.federation.aggregate import Arrays
from fedpeft.federation.evaluation import ppl
from fedpeft.federation.task_eval import PREFIX
from fedpeft.model.adapter_files import schema_json
from fedpeft.model.adapters import (
    adapter_state,
    load_adapter_state,
    peft_config_dict,
    schema_of,
    trainable_parameters,
)
from fedpeft.personal.store import GLOBAL, PERSONAL, PersonalStore, choose
from fedpeft.personal.strategies import Personalization, personal_seed, split_validation
from fedpeft.training.local import train

if TYPE_CHECKING:
    from fedpeft.data.blocks import UserData
    from fedpeft.data.clients import Clients
    from fedpeft.model.base import Base

CROSS_BLOCKS = 4  # per other user: 512 tokens at the default block size keep the last round's cost small


class PersonalAdapters:
    """The personal side of a Device. It uses the Device's model, data and evaluation (_apply, _eval,
    _score, _base_reference_loss)."""

    cfg: RunConfig
    base: Base
    model: Any
    adapter_cfg: AdapterConfig
    init_state: Arrays
    clients: Clients
    strategy: Personalization
    _reference: list | None
    stores: list[PersonalStore]  # per local user: its folder of the store

    def _init_personal(self) -> None:
        """Under a method that keeps personal adapters, each user's validation part (taken from its training
        text) and its store, refused before anything could write to it when made for another base."""
        cfg = self.cfg
        self.stores = []
        if not self.strategy.personal:
            return

        def with_val(data: UserData) -> UserData:
            train, val = split_validation(data, cfg.personal.val_fraction, cfg.data.min_eval_tokens)
            return replace(train, val=val)

        self.clients = self.clients.map(with_val)
        if not cfg.personal.store:
            raise FedpeftError("personalization needs a store for the personal adapters (--store)")
        schema = schema_json(schema_of(self.init_state))
        self.stores = [PersonalStore(cfg.personal.store, user) for user in self.clients.users]
        for store in self.stores:  # refuse a foreign store before anything could write to it
            store.check(self.fingerprint, schema)

    def load_personal(self, local: int) -> Arrays | None:
        return self.stores[local].load()

    def save_personal(self, local: int, arrays: Arrays, global_round: int) -> None:
        self._save(local, PERSONAL, arrays, global_round)

    def train_personal(
        self,
        local: int,
        client: int,
        rnd: int,
        pull: tuple[float, Arrays] | None = None,
        start: Arrays | None = None,
    ) -> Arrays:
        """personal.steps steps on user `local`'s text from the adapter loaded now, or from `start`; with
        `pull` = (lam, w) on loss + lam/2 ||v - w||^2 (Ditto's proximal term). Returns the trained adapter."""
        prox = None
        if pull is not None:
            lam, toward = pull
            self._apply(toward)
            prox = (lam, [p.detach().clone() for p in trainable_parameters(self.model)])
        if start is not None:
            load_adapter_state(self.model, start, what=f"personal adapter in {self.stores[local].dir}")
        tcfg = replace(
            self.cfg.train,
            steps=self.cfg.personal.steps,
            seed=personal_seed(self.cfg.federation.seed, rnd, client),
            progress=False,
        )
        train(
            self.model,
            self.clients[local],
            tcfg,
            self.cfg.personal.lr or client_lr(self.cfg),
            self.base.tokenizer.pad_token_id,
            self.base.compute,
            prox=prox,
        )
        return adapter_state(self.model)

    def _save(self, local: int, which: str, arrays: Arrays, global_round: int) -> None:
        self.stores[local].save(
            which,
            arrays,
            peft_config_dict(self.model),
            self.base.doc() | {"path": str(self.base.path)},
            self.adapter_cfg,
            global_round,
            self.strategy.name,
        )

    def _personal_forgetting(self, personal: Arrays, out: dict[str, Any]) -> str:
        """The personal adapter (loaded) on the reference text, into `out`; under --max-forgetting, why the
        device keeps its global adapter instead ('' when it need not)."""
        base = self._base_reference_loss()
        if base is None:
            return ""
        load_adapter_state(self.model, personal, what="personal adapter")
        out["reference_loss_personal"] = self._eval(self._reference or []).loss
        limit = self.cfg.federation.max_forgetting
        worse = 100 * (ppl(out["reference_loss_personal"]) / ppl(base) - 1)
        if limit > 0 and worse > limit:
            return (
                f"the personal adapter forgets: reference ppl {worse:.1f}% above the base's (--max-forgetting "
                f"{limit:g}); keeping the global adapter"
            )
        return ""

    def cross_eval(self, local: int, client: int, global_arrays: Arrays, personal: Arrays) -> dict[str, Any]:
        """The global and the personal adapter of client `local` on other users' held-out text: the first
        CROSS_BLOCKS blocks of up to personal.cross_users others (a seeded draw), pooled. A personal
        adapter that helps others as much as its own user only took extra generic steps; the server
        turns these into its specificity (fedpeft.federation.personal_summary.specificity). Only a simulation's process
        holds other users' text; a device has none and returns nothing."""
        others = [i for i in range(len(self.clients)) if i != local]
        n = min(self.cfg.personal.cross_users, len(others))
        if n == 0:
            return {}
        rng = np.random.default_rng([self.cfg.federation.seed, client, 2])
        chosen = sorted(rng.choice(others, size=n, replace=False).tolist())
        blocks = [b for i in chosen for b in self.clients[i].eval[:CROSS_BLOCKS]]
        load_adapter_state(self.model, global_arrays, what="global adapter")
        on_global = self._eval(blocks).loss
        load_adapter_state(self.model, personal, what="personal adapter")
        return {"others_loss_global": on_global, "others_loss_personal": self._eval(blocks).loss, "others": n}

    def personalize(
        self, local: int, global_arrays: Arrays, rnd: int, client: int | None = None, others: bool = False
    ) -> dict[str, Any]:
        """Held-out loss of the global and the personal adapter after global round `rnd`; keep the better
        one on the validation part (choice.json). Makes the personal adapter first under finetune. With
        `others` (a simulation's last round), also both adapters on other users' text (cross_eval).
        Returns scalars and short strings only: this is all that leaves the device."""
        client = local if client is None else client
        store, val = self.stores[local], self.clients[local].val
        full_global = {**self.init_state, **global_arrays}
        self._apply(global_arrays)
        held_out = self._eval(self.clients[local].eval)
        out: dict[str, Any] = {"eval_loss": held_out.loss, "eval_tokens": held_out.tokens}
        start = time.perf_counter()  # what follows is personalization's extra on-device time
        val_global = self._eval(val).loss if val else None
        personal = self.strategy.personal_adapter(self, local, client, rnd, global_arrays, full_global)
        note = forgetting = ""
        if personal is None:
            note = "no personal adapter yet (not sampled so far)"
        else:
            note, forgetting = self._evaluate_personal(local, client, rnd, personal, full_global, others, out)
        if val_global is not None:
            out["val_loss_global"] = val_global
        kept = choose(val_global, out["val_loss_personal"]) if "val_loss_personal" in out else GLOBAL
        if forgetting:
            kept, out["forgets"] = GLOBAL, 1.0
        self._save(local, GLOBAL, full_global, rnd)
        store.save_choice(
            {
                "user": store.user,
                "use": kept,
                "method": self.strategy.name,
                "global_round": rnd,
                "note": note,
                **{k: v for k, v in out.items() if k not in ("eval_loss", "eval_tokens")},
                "eval_loss_global": out["eval_loss"],
            }
        )
        out.update(kept=kept, note=note, personal_seconds=time.perf_counter() - start)
        return out

    def _evaluate_personal(
        self,
        local: int,
        client: int,
        rnd: int,
        personal: Arrays,
        full_global: Arrays,
        others: bool,
        out: dict[str, Any],
    ) -> tuple[str, str]:
        """The personal adapter's figures into `out`. Returns (the note for choice.json, why the device keeps
        the global adapter for forgetting, '' if it need not)."""
        store, val, note = self.stores[local], self.clients[local].val, ""
        load_adapter_state(self.model, personal, what=f"personal adapter in {store.dir}")
        out["personal_eval_loss"] = self._eval(self.clients[local].eval).loss
        task = self.clients[local].task
        if task is not None:  # the personal adapter on the same examples as the global one
            out.update(self._score(task, "personal_" + PREFIX))
        if others:
            out.update(self.cross_eval(local, client, full_global, personal))
        if val:
            out["val_loss_personal"] = self._eval(val).loss
        else:
            note = "too little text for a validation part; keeping the global adapter"
        forgetting = self._personal_forgetting(personal, out)
        if self.strategy.resaves_personal:  # new (finetune) or under the latest shared A (fedsa)
            self._save(local, PERSONAL, personal, rnd)
        return forgetting or note, forgetting
