"""What runs on a device in a federation: load the base once per process, then per message apply the
global adapter, train locally and return the delta, or evaluate. No Flower here (client/ is the glue).

With personalization (fedpeft.personal.strategies) the device also keeps one personal adapter per user in
its store (fedpeft.device.personal): nothing of it goes into a reply (only the shared keys' delta and
scalar metrics do).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedpeft.config.tree import RunConfig, client_adapter, client_lr
from fedpeft.data.blocks import UserData, tokenize_user
from fedpeft.data.chat import TaskEval
from fedpeft.data.clients import Clients
from fedpeft.data.partition import partition
from fedpeft.data.users import load_device_user
from fedpeft.device.personal import PersonalAdapters
from fedpeft.device.rank_slice import RankSlice
from fedpeft.errors import FedpeftError
from fedpeft.federation.aggregate import Arrays
from fedpeft.federation.evaluation import FULL_QUANT
from fedpeft.federation.forgetting import reference_blocks
from fedpeft.federation.ranks import travel_rank
from fedpeft.federation.state import client_seed
from fedpeft.federation.task_eval import PREFIX
from fedpeft.model.adapter_files import AdapterDescription
from fedpeft.model.adapters import (
    adapter_off,
    adapter_state,
    inject,
    load_adapter_state,
    peft_config_dict,
    schema_of,
)
from fedpeft.model.base import Base, load_base
from fedpeft.model.memory import full_base_mib
from fedpeft.personal.strategies import shared_keys, strategy_for
from fedpeft.training.local import evaluate, train
from fedpeft.training.task_metrics import score

log = logging.getLogger("fedpeft")


@dataclass
class FitResult:
    delta: Arrays  # local minus global, travel keys only
    num_examples: int  # training tokens of this client: the FedAvg weight n_k
    train_loss: float  # mean over the local steps
    seconds: float
    personal_seconds: float = 0.0  # on top of the federated training: the personal adapter's (ditto, fedsa)
    group: int = 1  # clients trained in lockstep with this one, itself included
    rank: int = 0  # the LoRA rank it trained (fedpeft.federation.ranks); 0 for other adapters


def _digest(arrays: Arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


class Device(PersonalAdapters):
    """One process's base + adapter + data. Reused across messages and virtual clients (simulation). Its
    personal side (fedpeft.device.personal) keeps the users' personal adapters."""

    def __init__(
        self,
        cfg: RunConfig,
        clients: Clients | list[UserData] | None = None,
        data_path: str | None = None,
        name: str = "",
    ) -> None:
        self.cfg = cfg
        self.base: Base = load_base(cfg.base, cfg.train.max_memory)
        BASE_LOADS[0] += 1
        adapter_cfg = client_adapter(cfg)
        self.adapter_cfg = adapter_cfg
        self.model = inject(self.base, adapter_cfg)
        self.init_state = adapter_state(self.model)
        self._full: tuple[Base, Any] | None = None  # the unquantized base, for round 0 and the last round
        self._base_losses: dict[int, float] = {}  # per local client: the base alone never changes
        self._full_base_losses: dict[int, float | None] = {}
        self._reference: list | None = None  # the reference text's blocks, tokenized on first use
        # ((round, the adapter's digest), the global adapter's loss on the reference text)
        self._reference_round: tuple[tuple[int, str], float] | None = None
        self._base_reference: float | None = None
        self.strategy = strategy_for(cfg)
        self.keys = shared_keys(list(self.init_state), adapter_cfg, self.strategy.name)
        self.slice = RankSlice(self.model, cfg, travel_rank(schema_of(self.init_state), self.keys))
        f = cfg.federation
        if data_path is not None:  # a real device: one user, its own text
            clients = [_own_data(data_path, name, cfg, self.base.tokenizer)]
        self.clients: Clients = (
            partition(cfg.data, self.base.tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
            if clients is None
            else clients
            if isinstance(clients, Clients)
            else Clients.of(clients)
        )
        self._init_personal()

    @property
    def fingerprint(self) -> str:
        """Of the exact quantized base: what its personal adapters are kept against."""
        return self.base.fingerprint

    @property
    def source(self) -> str:
        """Of the weights its base was quantized from: what a federation of mixed quantizations shares."""
        return self.base.source

    def describe(self) -> AdapterDescription:
        """What the server needs to know without loading the base: fingerprint, schema, PEFT config."""
        return AdapterDescription(
            fingerprint=self.source,  # the server names the federation's own (Roster.fingerprint)
            schema=schema_of(self.init_state),
            travel_keys=list(self.keys),
            peft_config=peft_config_dict(self.model),
            adapter=self.adapter_cfg,
            base_path=str(self.base.path),
            quant=self.base.quant,
            base=self.base.doc(),
        )

    def _apply(self, global_arrays: Arrays) -> None:
        load_adapter_state(self.model, {**self.init_state, **global_arrays}, what="global adapter")

    def fit(
        self, local: int, global_arrays: Arrays, rnd: int, client: int | None = None, cap: int = 0
    ) -> FitResult:
        """Train data `local` of this process; `client` (the federation's index, default `local`) seeds it.
        `cap`: the highest LoRA rank the round lets it train (0: its own)."""
        data = self.clients[local]
        client = local if client is None else client
        self.drop_full_base()  # training needs the memory; only round 0 and the last round use it
        personal = self.strategy.fit_start(self, local)  # FedSA: this user's own B under the shared A
        global_arrays = self.slice.enter(client, global_arrays, cap)  # a device of a smaller rank: its slice
        self._apply({**(personal or {}), **global_arrays})
        tcfg = replace(
            self.cfg.train,
            steps=self.cfg.federation.local_steps,
            seed=client_seed(self.cfg.federation.seed, rnd, client),
            progress=False,
        )
        result = train(
            self.model,
            data,
            tcfg,
            client_lr(self.cfg),
            self.base.tokenizer.pad_token_id,
            self.base.compute,
        )
        trained = adapter_state(self.model)
        delta = {k: (trained[k] - global_arrays[k]).astype(np.float32) for k in self.keys}
        start = time.perf_counter()
        self.strategy.after_fit(self, local, client, global_arrays, trained, rnd)
        return FitResult(
            delta,
            data.train_tokens,
            float(np.mean(result.losses)),
            result.seconds,
            time.perf_counter() - start,
            rank=self.slice.current,
        )

    def fit_many(self, jobs: list[tuple[int, Arrays, int, int]]) -> list[FitResult]:
        """fit() for several (local, global_arrays, round, client) at once: in lockstep through one base
        (fedpeft.training.lockstep) where it supports this adapter and training, else one after another."""
        from fedpeft.training.lockstep import chunks, group_that_fits, supports

        why = supports(self.model, self.adapter_cfg, self.cfg.train)
        if why is None and self.slice.ranks:
            why = "clients of different ranks mask different slices"
        if why is not None or len(jobs) < 2:
            if why is not None and len(jobs) > 1:
                log.debug("clients train one after another: %s", why)
            return [self.fit(*job) for job in jobs]
        self.drop_full_base()
        block = max((len(b) for local, *_ in jobs for b in self.clients[local].train), default=1)
        k = group_that_fits(self.model, self.cfg.train, block, self.base.compute, len(jobs))
        return [result for group in chunks(jobs, k) for result in self._fit_lockstep(group)]

    def _fit_lockstep(self, jobs: list[tuple[int, Arrays, int, int]]) -> list[FitResult]:
        from fedpeft.training.lockstep import ClientRun, train_many

        runs = []
        for local, global_arrays, rnd, client in jobs:
            personal = self.strategy.fit_start(self, local)
            start = {**self.init_state, **(personal or {}), **global_arrays}
            seed = client_seed(self.cfg.federation.seed, rnd, client)
            runs.append(ClientRun(start, self.clients[local], seed, self.cfg.federation.local_steps))
        tcfg = replace(self.cfg.train, progress=False)
        pad = self.base.tokenizer.pad_token_id
        train_many(self.model, runs, self.adapter_cfg, tcfg, client_lr(self.cfg), pad, self.base.compute)
        out = []
        for (local, global_arrays, rnd, client), run in zip(jobs, runs, strict=True):
            delta = {k: (run.trained[k] - global_arrays[k]).astype(np.float32) for k in self.keys}
            start = time.perf_counter()
            self.strategy.after_fit(self, local, client, global_arrays, run.trained, rnd)
            loss = float(np.mean(run.result.losses))
            seconds = time.perf_counter() - start
            result = FitResult(
                delta, run.data.train_tokens, loss, run.result.seconds, seconds, len(jobs), self.slice.full
            )
            out.append(result)
        return out

    def _eval(self, blocks: list) -> Any:
        return evaluate(
            self.model,
            blocks,
            self.base.tokenizer.pad_token_id,
            self.base.compute,
            self.cfg.train.eval_batch_size,
        )

    def evaluate(self, local: int, global_arrays: Arrays, bare: bool = False) -> tuple[float, int]:
        """Held-out loss of the global adapter on this client's text: (mean loss, tokens). `bare`: of the
        base alone, adapter disabled. The initial adapter is the identity only up to float rounding: peft
        runs LoRA's zero product and IA3's unit scales through fp32, so round 0 measured through them
        differed by adapter type (57.35 LoRA, 57.46 IA3 on the same base and text). A client of a smaller
        rank scores its slice of the global adapter, the adapter it keeps and uses."""
        self._apply(self.slice.enter(local, global_arrays))
        if not bare:
            r = self._eval(self.clients[local].eval)
        else:
            with adapter_off(self.model):
                r = self._eval(self.clients[local].eval)
        return r.loss, r.tokens

    def task_scores(self, local: int, global_arrays: Arrays, bare: bool = False) -> dict[str, float]:
        """The global adapter (`bare`: the base alone, zero-shot) on this client's held-out examples:
        counts the server pools (fedpeft.federation.task_eval); {} for raw text."""
        task = self.clients[local].task
        if task is None:
            return {}
        self._apply(self.slice.enter(local, global_arrays))
        with adapter_off(self.model) if bare else contextlib.nullcontext():
            return self._score(task)

    def _score(self, task: TaskEval, prefix: str = PREFIX) -> dict[str, float]:
        batch = self.cfg.train.eval_batch_size
        return score(
            self.model,
            self.base.tokenizer,
            task,
            self.base.compute,
            self.cfg.data.answer_tokens,
            batch,
            prefix,
        )

    def reference_losses(self, rnd: int, global_arrays: Arrays) -> dict[str, float]:
        """The global adapter and the base alone on the reference text (fedpeft.federation.forgetting), or {} without
        one. Every client of a round scores the same adapter on the same text: a process that serves many
        (a simulation's actor) computes it once a round, and the base's once."""
        base = self._base_reference_loss()
        if base is None:
            return {}
        if rnd == 0:  # round 0 reports the base, as its held-out figure does (prompt tuning's init is not it)
            return {"reference_loss": base, "base_reference_loss": base}
        # keyed by the adapter's bytes too: a device's worker may serve a later run whose rounds count anew
        key = (rnd, _digest(global_arrays))
        if self._reference_round is None or self._reference_round[0] != key:
            self._apply(global_arrays)
            self._reference_round = (key, self._eval(self._reference or []).loss)
        return {"reference_loss": self._reference_round[1], "base_reference_loss": base}

    def _base_reference_loss(self) -> float | None:
        """The base alone on the reference text (None without one); the blocks are tokenized once."""
        if self._reference is None:
            self._reference = reference_blocks(self.cfg.data, self.base.tokenizer)
        if not self._reference:
            return None
        if self._base_reference is None:
            with adapter_off(self.model):
                self._base_reference = self._eval(self._reference).loss
        return self._base_reference

    def base_loss(self, local: int, global_arrays: Arrays) -> float:
        """The base alone on this client's held-out text: computed once (it never changes)."""
        if local not in self._base_losses:
            self._base_losses[local] = self.evaluate(local, global_arrays, bare=True)[0]
        return self._base_losses[local]

    def full_base_loss(self, local: int, global_arrays: Arrays) -> float | None:
        """The unquantized base alone on the same text (None where evaluate_full gives none); once."""
        if local not in self._full_base_losses:
            self._full_base_losses[local] = self.evaluate_full(local, global_arrays, bare=True)
        return self._full_base_losses[local]

    def evaluate_full(self, local: int, global_arrays: Arrays, bare: bool = False) -> float | None:
        """Held-out loss of the same adapter on the unquantized base (cfg.base.full_base): what the
        quantization costs (round 0, `bare`) and what a merge onto the full-precision base gives (last
        round). None when off or when the device's base is that base already."""
        quant = FULL_QUANT.get(self.cfg.base.full_base)
        if quant is None:
            return None
        if quant == self.base.quant:
            return self.evaluate(local, global_arrays, bare)[0]
        if self._full is None:  # loaded on first use, dropped before the next training
            if not self._full_base_fits(
                quant, len(self.clients[local].eval[0]) if self.clients[local].eval else 0
            ):
                return None
            # it computes as this device's own base does (fp32 for the fp32 reference)
            compute = "fp32" if quant == "none" else self.base.compute
            full = load_base(replace(self.cfg.base, quant=quant, compute_dtype=compute))
            self._full = (full, inject(full, self.adapter_cfg))
        full, model = self._full
        arrays = {**self.init_state, **self.slice.enter(local, global_arrays)}  # as evaluate(): its slice
        load_adapter_state(model, arrays, what="global adapter")
        pad, batch = full.tokenizer.pad_token_id, self.cfg.train.eval_batch_size
        if not bare:
            return evaluate(model, self.clients[local].eval, pad, full.compute, batch).loss
        with adapter_off(model):
            return evaluate(model, self.clients[local].eval, pad, full.compute, batch).loss

    def _full_base_fits(self, quant: str, block_len: int) -> bool:
        """A device's --max-memory holds the unquantized base beside its own, or the device skips that
        evaluation (the server reports the full-base figures of the devices that ran it)."""
        budget = self.cfg.train.max_memory
        if not budget:
            return True
        adapter_params = sum(int(np.prod(a.shape)) for a in self.init_state.values())
        tokens = max(block_len, 1) * self.cfg.train.eval_batch_size
        need = full_base_mib(self.base, quant, adapter_params, tokens, self.cfg.train)
        if need > budget:
            log.warning(
                "the unquantized base (%s) needs about %.0f MiB beside this device's %s base, over --max-memory "
                "%g MiB: this device skips the full-base evaluation",
                quant, need, self.base.quant, budget,
            )  # fmt: skip
            return False
        return True

    def drop_full_base(self) -> None:
        if self._full is not None:
            self._full = None
            gc.collect()


def _own_data(data_path: str, name: str, cfg: RunConfig, tokenizer: Any) -> UserData:
    """A device's own data read with the federation's data options. What is wrong with it stays in the
    device's log: an error reply goes to the server, and the server chooses the options (columns, labels)
    whose errors would quote the records (a label, a role, the columns' names) back to it."""
    try:
        return tokenize_user(load_device_user(data_path, name, cfg.data), tokenizer, cfg.data)
    except FedpeftError as e:
        log.error("this device's data does not fit the federation's data options: %s", e)
        raise FedpeftError(
            "this device's data does not fit the federation's data options (format, columns, labels, "
            "block size); the reason is in the device's log"
        ) from None


_DEVICES: dict[tuple[RunConfig, str | None, str], Device] = {}
BASE_LOADS = [0]  # how many times this process has loaded a base (reported per round: should stay 1)


def _any_quant(key: tuple[RunConfig, str | None, str]) -> tuple[RunConfig, str | None, str]:
    cfg = key[0]
    if not cfg.federation.client_quants:
        return key
    return (replace(cfg, base=replace(cfg.base, quant="auto")), *key[1:])


def get_device(cfg: RunConfig, data_path: str | None = None, name: str = "") -> Device:
    """A per-process cache: a Flower actor, or a device's resident worker (fedpeft.device.worker), loads the base
    once, not every round. A new run config that changes the base, the adapter or the data loads anew."""
    key = (
        replace(cfg, federation=replace(cfg.federation, rounds=0), server_opt=type(cfg.server_opt)()),
        data_path,
        name,
    )
    if key not in _DEVICES:
        # one base per process (memory is the edge device's scarcest resource), except that a simulation of
        # several quantizations (--client-quants) keeps one of each: its clients take turns every round
        same_run = _any_quant(key)
        for other in [k for k in _DEVICES if _any_quant(k) != same_run]:
            del _DEVICES[other]
        _DEVICES[key] = Device(cfg, data_path=data_path, name=name)
    return _DEVICES[key]
