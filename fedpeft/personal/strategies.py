"""The personalization methods as strategy objects: what each changes, on the device and on the server.
STRATEGIES maps --personalize's choices to them; everything that differs by method asks its strategy.

- none: every user keeps the global adapter;
- finetune: the latest global adapter plus a few local steps, made at the federation's last evaluation,
  by default keeping only the part of their change that is specific to the user (specific_change);
- fedsa: FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
  ICLR 2025): LoRA A is shared and aggregated, B never leaves the device. Alone, the global adapter
  (A with B at its zero init) computes exactly the base model;
- ditto: Ditto (Li et al., ICML 2021): the global adapter trains as usual, and each time a client is
  sampled it also trains its personal adapter v on lam/2 ||v - w||^2 + its loss, w the global adapter.

The device's side runs through PersonalOps (fedpeft.device.personal implements it); this module imports
no torch: the server asks it too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedpeft.model.adapter_files import trains

if TYPE_CHECKING:
    import torch

    from fedpeft.config.tree import AdapterConfig, PersonalConfig, RunConfig
    from fedpeft.data.blocks import UserData

Arrays = dict[str, np.ndarray]


class PersonalOps(Protocol):
    """What a strategy asks of the device it runs on (fedpeft.device.personal.PersonalAdapters)."""

    cfg: RunConfig
    init_state: Arrays

    def load_personal(self, local: int) -> Arrays | None: ...

    def save_personal(self, local: int, arrays: Arrays, global_round: int) -> None: ...

    def train_personal(
        self,
        local: int,
        client: int,
        rnd: int,
        pull: tuple[float, Arrays] | None = None,
        start: Arrays | None = None,
    ) -> Arrays: ...


class Personalization:
    """No personal adapter (`none`); the base the methods below change."""

    name = "none"
    personal = False  # devices keep a personal adapter per user: a store, a validation part, a choice
    resaves_personal = True  # the last evaluation stores the personal adapter it evaluated

    def shared_keys(self, names: list[str]) -> list[str]:
        """The adapter tensors clients train and the server aggregates (FFA-LoRA aside: shared_keys)."""
        return list(names)

    def aggregation_note(self) -> str | None:
        """How the server aggregates LoRA under this method, where the method decides it."""
        return None

    def evaluates_personal(self, rnd: int, rounds: int) -> bool:
        """Whether round `rnd` of `rounds` evaluates the personal adapters."""
        return False

    def label(self, personal: PersonalConfig) -> str:
        """The method as the summary line names it."""
        return self.name

    def fit_start(self, ops: PersonalOps, local: int) -> Arrays | None:
        """Arrays the federated training starts from under the global ones (None: the global adapter)."""
        return None

    def after_fit(
        self, ops: PersonalOps, local: int, client: int, global_arrays: Arrays, trained: Arrays, rnd: int
    ) -> None:
        """The personal adapter's share of a sampled round, after the federated training."""

    def personal_adapter(
        self, ops: PersonalOps, local: int, client: int, rnd: int, global_arrays: Arrays, full_global: Arrays
    ) -> Arrays | None:
        """The personal adapter the last evaluation compares with the global one (None: none yet)."""
        return None


class _KeptEachRound(Personalization):
    """A personal adapter trained in every sampled round and kept in the store between rounds."""

    personal = True

    def evaluates_personal(self, rnd: int, rounds: int) -> bool:
        return rnd >= 1  # held from the first sampled round on

    def personal_adapter(
        self, ops: PersonalOps, local: int, client: int, rnd: int, global_arrays: Arrays, full_global: Arrays
    ) -> Arrays | None:
        return ops.load_personal(local)


class Finetune(Personalization):
    name = "finetune"
    personal = True

    def evaluates_personal(self, rnd: int, rounds: int) -> bool:
        return rnd >= 1 and rnd == rounds  # made at the federation's last round only

    def label(self, personal: PersonalConfig) -> str:
        """finetune says which part of its change it keeps."""
        return f"finetune, {'specific' if personal.change == 'specific' else 'whole'} change"

    def personal_adapter(
        self, ops: PersonalOps, local: int, client: int, rnd: int, global_arrays: Arrays, full_global: Arrays
    ) -> Arrays | None:
        personal = ops.train_personal(local, client, rnd)  # from the latest global adapter (loaded)
        if ops.cfg.personal.change == "specific":
            personal = specific_change(personal, full_global, ops.init_state)
        return personal


class FedSA(_KeptEachRound):
    name = "fedsa"

    def shared_keys(self, names: list[str]) -> list[str]:
        return [n for n in names if ".lora_A." in n]  # B is personal

    def aggregation_note(self) -> str | None:
        return "FedSA-LoRA (A averaged, B personal: stays on each device)"

    def fit_start(self, ops: PersonalOps, local: int) -> Arrays | None:
        return ops.load_personal(local)  # this user's own B under the shared A (the global arrays hold A)

    def after_fit(
        self, ops: PersonalOps, local: int, client: int, global_arrays: Arrays, trained: Arrays, rnd: int
    ) -> None:
        ops.save_personal(local, trained, rnd - 1)

    def personal_adapter(
        self, ops: PersonalOps, local: int, client: int, rnd: int, global_arrays: Arrays, full_global: Arrays
    ) -> Arrays | None:
        personal = ops.load_personal(local)
        return None if personal is None else {**personal, **global_arrays}  # the latest shared A, own B


class Ditto(_KeptEachRound):
    name = "ditto"
    resaves_personal = False  # it stays as it was trained

    def after_fit(
        self, ops: PersonalOps, local: int, client: int, global_arrays: Arrays, trained: Arrays, rnd: int
    ) -> None:
        """Ditto's personal step (Li et al., ICML 2021, Algorithm 1): from the stored personal adapter (the
        global one the first time), `steps` steps on loss + lam/2 ||v - w||^2, w the global adapter the
        round started from."""
        pull = (ops.cfg.personal.lam, global_arrays)
        personal = ops.train_personal(local, client, rnd, pull=pull, start=ops.load_personal(local))
        ops.save_personal(local, personal, rnd - 1)


STRATEGIES: dict[str, Personalization] = {
    s.name: s for s in (Personalization(), Finetune(), FedSA(), Ditto())
}


def strategy_for(cfg: RunConfig) -> Personalization:
    return STRATEGIES[cfg.personal.method]


def shared_keys(names: list[str], adapter: AdapterConfig, method: str) -> list[str]:
    """The adapter tensors that clients train and exchange: those that train (LoRA B only under FFA-LoRA, A
    staying at the seeded init every client builds identically; the r x r matrix only under Fed-SB; not
    VeRA's shared random matrices); of those, LoRA A only under FedSA (B is personal)."""
    return STRATEGIES[method].shared_keys([n for n in names if trains(n, adapter)])


def method_label(personal: PersonalConfig) -> str:
    """The method as the summary line names it: finetune says which part of its change it keeps."""
    return STRATEGIES[personal.method].label(personal)


def personal_seed(seed: int, rnd: int, client: int) -> int:
    """Seeds personal training apart from the client's federated training of the same round."""
    return int(np.random.default_rng([seed, rnd, client, 1]).integers(2**31 - 1))


def split_validation(data: UserData, fraction: float, min_tokens: int) -> tuple[UserData, list[torch.Tensor]]:
    """The tail `fraction` of a user's training blocks becomes the validation part (time order, as with the
    held-out part); it is no longer trained on. Too little text for `min_tokens`, or nothing left to
    train on: no validation part (the user then keeps the global adapter)."""
    n = max(1, round(len(data.train) * fraction))
    val = data.train[-n:]
    if len(data.train) - n < 1 or sum(len(b) for b in val) < min_tokens:
        return data, []
    return replace(data, train=data.train[:-n]), val


def specific_change(personal: Arrays, global_: Arrays, init: Arrays) -> Arrays:
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
