import pytest

from fedpeft.config import (
    AdapterConfig,
    FederationConfig,
    RunConfig,
    ServerOptConfig,
    TrainConfig,
    from_run_config,
    to_run_config,
)


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
    with pytest.raises(ValueError, match="unknown run config key"):
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
    from fedpeft.errors import FedpeftError

    flat = {**to_run_config(RunConfig(federation=FederationConfig(secagg=True))), key: value}
    with pytest.raises(FedpeftError, match=match):
        from_run_config(flat)
