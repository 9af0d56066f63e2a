"""One typed configuration tree, the only place an option is written: the place to import it from.

Each field declares its default, help, command-line flag and range once (`option(...)`, fedpeft.config.fields);
the CLI (fedpeft.config.flags), config files (simulations/*.toml), Flower's flat run config and the
`[tool.flwr.app.config]` table of pyproject.toml are all generated from it, and every entry runs the same
`validate()`. Enumerated fields are `Literal` types: their choices come from the type. Where each part is:
- fedpeft.config.learning: base, adapter, data and training sections, and the commands that offer them;
- fedpeft.config.federated: federation, server optimizer, personalization and privacy sections;
- fedpeft.config.run_config: RunConfig (the run config's root), fields(), what every client derives from it;
- fedpeft.config.validate: the checks across fields;
- fedpeft.config.local and .node: LocalConfig, the options that never travel (a device's, serve's, ...).
"""

from __future__ import annotations

from fedpeft.config.federated import (
    DP_MODES,
    PERSONALIZE,
    SERVER_OPTS,
    SPLITS,
    TRACKERS,
    DpMode,
    FederationConfig,
    LoraMode,
    PersonalChange,
    PersonalConfig,
    Personalize,
    PrivacyConfig,
    ServerOpt,
    ServerOptConfig,
    Split,
)
from fedpeft.config.learning import (
    ADAPTER_READERS,
    ADAPTERS,
    ALL,
    FEDERATION,
    IA3_FEEDFORWARD,
    IA3_TARGETS,
    LEARNING_RATES,
    LORA_TARGETS,
    QUANTS,
    TRAIN,
    AdapterConfig,
    AdapterKind,
    BaseConfig,
    ComputeDtype,
    DataConfig,
    DataFormat,
    FullBase,
    Quant,
    Task,
    TooLong,
    TorchDevice,
    TrainConfig,
)
from fedpeft.config.local import (
    CertsConfig,
    ConnectConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    LocalConfig,
    NetworkConfig,
    ServeConfig,
    local_fields,
)
from fedpeft.config.node import DeviceConfig
from fedpeft.config.run_config import RunConfig, client_adapter, client_lr, fields
from fedpeft.config.validate import dp_delta, sampled_per_round, validate

__all__ = [
    "ADAPTERS",
    "ADAPTER_READERS",
    "ALL",
    "DP_MODES",
    "FEDERATION",
    "IA3_FEEDFORWARD",
    "IA3_TARGETS",
    "LEARNING_RATES",
    "LORA_TARGETS",
    "PERSONALIZE",
    "QUANTS",
    "SERVER_OPTS",
    "SPLITS",
    "TRACKERS",
    "TRAIN",
    "AdapterConfig",
    "AdapterKind",
    "BaseConfig",
    "CertsConfig",
    "ComputeDtype",
    "ConnectConfig",
    "DataConfig",
    "DataFormat",
    "DeviceConfig",
    "DpMode",
    "EvalConfig",
    "ExportConfig",
    "FederationConfig",
    "FullBase",
    "GenerateConfig",
    "LocalConfig",
    "LoraMode",
    "NetworkConfig",
    "PersonalChange",
    "PersonalConfig",
    "Personalize",
    "PrivacyConfig",
    "Quant",
    "RunConfig",
    "ServeConfig",
    "ServerOpt",
    "ServerOptConfig",
    "Split",
    "Task",
    "TooLong",
    "TorchDevice",
    "TrainConfig",
    "client_adapter",
    "client_lr",
    "dp_delta",
    "fields",
    "local_fields",
    "sampled_per_round",
    "validate",
]
