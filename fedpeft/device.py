"""What runs on a device in a federation: load the base once per process, then per message apply the
global adapter, train locally and return the delta, or evaluate. No Flower here (client/ is the glue).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fedpeft.adapters import adapter_state, inject, load_adapter_state, peft_config_dict, schema_of
from fedpeft.aggregate import Arrays
from fedpeft.base import Base, load_base
from fedpeft.config import RunConfig, client_adapter, client_lr
from fedpeft.data import UserData, load_device_user, tokenize_user
from fedpeft.federation import client_seed
from fedpeft.partition import partition
from fedpeft.train import evaluate, train


def travel_keys(names: list[str], lora_mode: str) -> list[str]:
    """The adapter tensors that clients train and exchange: all of them, or LoRA B only under FFA-LoRA
    (A stays at the seeded init every client builds identically)."""
    if lora_mode == "ffa":
        return [n for n in names if ".lora_B." in n]
    return list(names)


@dataclass
class FitResult:
    delta: Arrays  # local minus global, travel keys only
    num_examples: int  # training tokens of this client: the FedAvg weight n_k
    train_loss: float  # mean over the local steps
    seconds: float


class Device:
    """One process's base + adapter + data. Reused across messages and virtual clients (simulation)."""

    def __init__(
        self,
        cfg: RunConfig,
        clients: list[UserData] | None = None,
        data_path: str | None = None,
        name: str = "",
    ) -> None:
        self.cfg = cfg
        self.base: Base = load_base(cfg.base)
        adapter_cfg = client_adapter(cfg)
        self.adapter_cfg = adapter_cfg
        self.model = inject(self.base, adapter_cfg)
        self.init_state = adapter_state(self.model)
        self.keys = travel_keys(list(self.init_state), cfg.federation.lora_mode)
        f = cfg.federation
        if data_path is not None:  # a real device: one user, its own text
            clients = [tokenize_user(load_device_user(data_path, name), self.base.tokenizer, cfg.data)]
        self.clients = (
            clients
            if clients is not None
            else partition(cfg.data, self.base.tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
        )

    @property
    def fingerprint(self) -> str:
        return self.base.fingerprint

    def describe(self) -> dict[str, Any]:
        """What the server needs to know without loading the base: fingerprint, schema, init, PEFT config."""
        return {
            "fingerprint": self.fingerprint,
            "schema": [[n, list(s), d] for n, s, d in schema_of(self.init_state)],
            "travel_keys": self.keys,
            "peft_config": peft_config_dict(self.model),
            "adapter": asdict(self.adapter_cfg),
            "base_path": str(self.base.path),
            "quant": self.base.quant,
        }

    def _apply(self, global_arrays: Arrays) -> None:
        load_adapter_state(self.model, {**self.init_state, **global_arrays}, what="global adapter")

    def fit(self, local: int, global_arrays: Arrays, rnd: int, client: int | None = None) -> FitResult:
        """Train data `local` of this process; `client` (the federation's index, default `local`) seeds it."""
        data = self.clients[local]
        client = local if client is None else client
        self._apply(global_arrays)
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
            self.base.quant,
        )
        local = adapter_state(self.model)
        delta = {k: (local[k] - global_arrays[k]).astype(np.float32) for k in self.keys}
        return FitResult(delta, data.train_tokens, float(np.mean(result.losses)), result.seconds)

    def evaluate(self, client: int, global_arrays: Arrays) -> tuple[float, int]:
        """Held-out loss of the global adapter on this client's text: (mean loss, tokens)."""
        self._apply(global_arrays)
        r = evaluate(
            self.model,
            self.clients[client].eval,
            self.base.tokenizer.pad_token_id,
            self.base.quant,
            self.cfg.train.eval_batch_size,
        )
        return r.loss, r.tokens


_DEVICES: dict[tuple[RunConfig, str | None, str], Device] = {}


def get_device(cfg: RunConfig, data_path: str | None = None, name: str = "") -> Device:
    """A per-process cache: a Flower actor loads the base once, not every round (a SuperNode runs each
    message in a fresh process, so there it is loaded per message; see README, deployment)."""
    key = (
        replace(cfg, federation=replace(cfg.federation, rounds=0), server_opt=type(cfg.server_opt)()),
        data_path,
        name,
    )
    if key not in _DEVICES:
        _DEVICES.clear()  # one base per process: memory is the edge device's scarcest resource
        _DEVICES[key] = Device(cfg, data_path=data_path, name=name)
    return _DEVICES[key]
