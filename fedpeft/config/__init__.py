"""The config tree: every option written once, and what follows from it (flags, TOML files, Flower's run config).

    from fedpeft.config import RunConfig, FederationConfig
    cfg = RunConfig(federation=FederationConfig(rounds=3))

The library imports the submodules (fedpeft.config.tree, .files, .flags), never this package's names."""

from fedpeft.config.tree import (
    AdapterConfig,
    BaseConfig,
    DataConfig,
    DeviceConfig,
    FederationConfig,
    PersonalConfig,
    PrivacyConfig,
    RunConfig,
    ServerOptConfig,
    TrainConfig,
    validate,
)

__all__ = [
    "AdapterConfig",
    "BaseConfig",
    "DataConfig",
    "DeviceConfig",
    "FederationConfig",
    "PersonalConfig",
    "PrivacyConfig",
    "RunConfig",
    "ServerOptConfig",
    "TrainConfig",
    "validate",
]
