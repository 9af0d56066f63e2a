import re
from dataclasses import replace

import pytest

from fedpeft.config.fields import choices
from fedpeft.config.files import from_run_config, to_run_config
from fedpeft.config.tree import (
    AdapterConfig,
    FederationConfig,
    PersonalConfig,
    PrivacyConfig,
    RunConfig,
    ServerOptConfig,
    TrainConfig,
    fields,
    validate,
)
from fedpeft.errors import FedpeftError


def test_flat_run_config_round_trips() -> None:
    cfg = RunConfig(
        adapter=AdapterConfig(kind="lora", target_modules=("k_proj", "v_proj")),
        train=TrainConfig(lr=1e-3),
        federation=FederationConfig(lora_mode="ffa", rounds=7),
        server_opt=ServerOptConfig("fedyogi"),
    )
    flat = to_run_config(cfg)
    assert flat["adapter.target_modules"] == "k_proj,v_proj" and flat["server_opt.lr"] == ""
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert from_run_config(flat) == cfg


def test_partial_and_string_values() -> None:
    cfg = from_run_config({"federation.rounds": "3", "train.progress": "false", "server_opt.lr": "0.01"})
    assert cfg.federation.rounds == 3 and cfg.train.progress is False and cfg.server_opt.lr == 0.01


def test_unknown_key() -> None:
    with pytest.raises(FedpeftError, match="unknown key 'federation.roundz' in the run config"):
        from_run_config({"federation.roundz": 3})


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("federation.fraction", 2.5, "--fraction must be in"),
        ("federation.lora_mode", "bogus", "--lora-mode must be one of"),
        ("adapter.kind", "nope", "--adapter must be one of"),
        ("federation.min_clients", 50, "--min-clients 50 exceeds"),
        ("federation.secagg_k", 1, "--secagg-k must be at least 2"),
    ],
)
def test_flower_run_config_is_validated_as_the_cli_is(key: str, value: object, match: str) -> None:
    flat = {**to_run_config(RunConfig(federation=FederationConfig(secagg=True))), key: value}
    with pytest.raises(FedpeftError, match=match):
        from_run_config(flat)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"adapter": AdapterConfig(kind="ia3")}, "needs --adapter lora"),
        ({"federation": FederationConfig(lora_mode="ffa")}, "FFA-LoRA freezes A"),
        ({"personal": PersonalConfig(method="nope")}, "--personalize must be one of"),
        ({"personal": PersonalConfig(method="ditto", val_fraction=1.5)}, "--val-fraction"),
        ({"privacy": PrivacyConfig(mode="central")}, "needs exactly one of --dp-noise-multiplier"),
        ({"privacy": PrivacyConfig(mode="central", noise_multiplier=1, epsilon=8)}, "needs exactly one of"),
        ({"privacy": PrivacyConfig(mode="central", clip=0, noise_multiplier=1)}, "--dp-clip"),
        ({"privacy": PrivacyConfig(mode="local")}, "--dp must be one of"),
    ],
)
def test_impossible_combinations_are_refused(change: dict, match: str) -> None:
    cfg = replace(RunConfig(personal=PersonalConfig(method="fedsa")), **change)
    with pytest.raises(FedpeftError, match=match):
        validate(cfg)


def test_every_field_is_typed_documented_and_has_a_unique_flag() -> None:
    """The tree is the only place an option is written: each flag belongs to one field (or fields that
    share it on purpose, like --seed), every enumerated field is a Literal, every flag has help."""
    flags: dict[str, list[str]] = {}
    for f in fields():
        if f.meta["flag"]:
            flags.setdefault(f.meta["flag"], []).append(f.key)
        free_text = (
            "model",
            "cache_dir",
            "data",
            "base_fingerprint",
            "store",
            "base_id",
            "ray_address",
            "reference_text",
            # task data's column names and label set are the user's own words
            "user_column",
            "prompt_column",
            "completion_column",
            "label_column",
            "labels",
        )
        assert f.hint is not str or f.name in free_text, f.key
    enumerated = {f.key for f in fields() if choices(f.hint)}
    assert enumerated == {
        "base.quant",
        "base.compute_dtype",
        "base.full_base",
        "base.device",
        "adapter.kind",
        "federation.lora_mode",
        "federation.split",
        "server_opt.name",
        "personal.method",
        "personal.change",
        "privacy.mode",
        "data.format",
        "data.task",
        "data.too_long",
    }
    shared = {flag: keys for flag, keys in flags.items() if len(keys) > 1}
    assert shared == {"--seed": ["adapter.seed", "train.seed", "federation.seed"]}
    documented = {f.meta["flag"] for f in fields() if f.meta["flag"] and f.meta["help"]}
    assert documented == set(flags)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"train": TrainConfig(steps=0)}, "--steps must be positive, got 0"),
        ({"train": TrainConfig(weight_decay=-1.0)}, "--weight-decay must be not negative"),
        ({"adapter": AdapterConfig(dropout=1.0)}, "--lora-dropout must be in [0, 1), got 1.0"),
        ({"adapter": AdapterConfig(target_modules=())}, "--targets names no module"),
        ({"data": replace(RunConfig().data, min_eval_tokens=0)}, "data.min_eval_tokens must be at least 1"),
        ({"server_opt": ServerOptConfig(beta2=1.0)}, "--server-beta2 must be in [0, 1)"),
    ],
)
def test_ranges_come_from_the_fields(change: dict, match: str) -> None:
    with pytest.raises(FedpeftError, match=re.escape(match)):
        validate(replace(RunConfig(), **change))
