"""The root of the config tree: RunConfig, what a command or a run config holds and what travels to every
client, and what follows from it for every client."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

from fedpeft.config.federated import FederationConfig, PersonalConfig, PrivacyConfig, ServerOptConfig
from fedpeft.config.fields import Field, leaves, section
from fedpeft.config.learning import ALL, FEDERATION, AdapterConfig, BaseConfig, DataConfig, TrainConfig


@dataclass(frozen=True)
class RunConfig:
    base: BaseConfig = section(BaseConfig, ALL)
    adapter: AdapterConfig = section(AdapterConfig, ALL)
    data: DataConfig = section(DataConfig, ALL)
    train: TrainConfig = section(TrainConfig, ALL)
    federation: FederationConfig = section(FederationConfig, FEDERATION)
    server_opt: ServerOptConfig = section(ServerOptConfig, FEDERATION)
    personal: PersonalConfig = section(PersonalConfig, FEDERATION)
    privacy: PrivacyConfig = section(PrivacyConfig, FEDERATION)


@functools.cache
def fields() -> tuple[Field, ...]:
    """Every leaf of RunConfig, in declaration order (resolved once: a device parses the run config on every
    message)."""
    return tuple(leaves(RunConfig))


def client_adapter(cfg: RunConfig) -> AdapterConfig:
    """The adapter every client of a federation builds: seeded by the federation's seed (so all build the
    same init), with A frozen under FFA-LoRA. Clients and server both derive it from here."""
    adapter = dataclasses.replace(
        cfg.adapter,
        freeze_a=cfg.adapter.freeze_a or cfg.federation.lora_mode == "ffa",
        lora_sb=cfg.federation.lora_mode == "sb",
        seed=cfg.federation.seed,
    )
    return dataclasses.replace(adapter, r=adapter.rank)  # resolved once, for every file and message


def client_lr(cfg: RunConfig) -> float:
    a = client_adapter(cfg)
    return cfg.train.learning_rate("sb" if a.lora_sb else a.kind, a.freeze_a)
