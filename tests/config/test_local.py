"""Every command's flags come from the config tree; what stays on a machine (a device's policy, serve's
network) is a tree of its own that never enters Flower's run config."""

import argparse
import typing
from pathlib import Path

import pytest

from fedpeft.config.files import flwr_app_config, from_run_config, load_toml, to_run_config
from fedpeft.config.flags import add_config_flags, config_from_args, field_value, local_section
from fedpeft.config.local import local_fields
from fedpeft.config.node import DeviceConfig
from fedpeft.config.tree import RunConfig, TrainConfig
from fedpeft.errors import FedpeftError

LOCAL_COMMANDS = ("client", "certs", "export", "generate", "eval", "serve")


def _args(command: str, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, command)
    return parser.parse_args(list(argv))


def test_the_package_offers_the_tree() -> None:
    from fedpeft.config import FederationConfig
    from fedpeft.config import RunConfig as Root

    assert Root(federation=FederationConfig(rounds=3)).federation.rounds == 3


@pytest.mark.parametrize("command", LOCAL_COMMANDS)
def test_every_offered_local_field_has_its_flag(command: str) -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, command)
    options = {s for a in parser._actions for s in a.option_strings}
    wanted = {f.meta["flag"] for f in local_fields() if f.meta["flag"] and command in f.commands}
    assert wanted and wanted <= options


def test_local_options_never_enter_the_run_config(tmp_path: Path) -> None:
    """The server must not be able to set a device's policy: it is not in the run config, a config file or
    pyproject's [tool.flwr.app.config], and a run config that names it is refused."""
    local = {f.key for f in local_fields()}
    flat = to_run_config(RunConfig())
    assert not local & set(flat)
    assert not set(flwr_app_config()) & {f.section for f in local_fields()}
    with pytest.raises(FedpeftError, match="unknown key 'device.require_secagg' in the run config"):
        from_run_config({**flat, "device.require_secagg": False})
    path = tmp_path / "c.toml"
    path.write_text("[device]\nmin_neighbours = 1\n")
    with pytest.raises(FedpeftError, match="unknown key 'device.min_neighbours'"):
        load_toml(path)


def test_client_flags_are_the_device_config_and_the_connection() -> None:
    a = _args("client", "--server", "h:1", "--data", "d.txt", "--max-memory", "512.5", "--require-secagg")
    assert local_section(a, "client", "device") == DeviceConfig(
        data_path="d.txt", max_memory=512.5, require_secagg=True
    )
    assert local_section(a, "client", "connect").server == "h:1"
    assert field_value(a, "base.model") is None  # the command's default: the packaged base
    a = _args("client", "--server", "h:1", "--data", "d", "--compute-dtype", "fp64")
    with pytest.raises(
        FedpeftError, match="--compute-dtype must be one of auto, fp32, bf16, fp16, got 'fp64'"
    ):
        local_section(a, "client", "device")
    a = _args("client", "--server", "h:1", "--data", "d", "--threads", "0")
    with pytest.raises(FedpeftError, match="--threads must be at least 1, got 0"):
        local_section(a, "client", "connect")


def test_max_memory_is_mib_as_a_float_everywhere() -> None:
    device = typing.get_type_hints(DeviceConfig)["max_memory"]
    train = typing.get_type_hints(TrainConfig)["max_memory"]
    assert device is float and train == float | None
    with pytest.raises(FedpeftError, match="--max-memory must be not negative"):
        local_section(
            _args("client", "--server", "h:1", "--data", "d", "--max-memory", "-1"), "client", "device"
        )


def test_repeated_and_listed_flags() -> None:
    serve = local_section(_args("serve", "--adapter", "a=x,y", "--adapter", "b=z"), "serve", "serve")
    assert serve.adapter == ("a=x,y", "b=z") and serve.port == 8000
    net = local_section(_args("server", "--client-keys", "a.pub", "b.pub", "--no-auth"), "server", "network")
    assert net.client_keys == ("a.pub", "b.pub") and not net.auth and net.port == 9092
    certs = local_section(_args("certs", "--san", "10.0.0.1", "--san", "host"), "certs", "certs")
    assert certs.san == ("10.0.0.1", "host") and certs.out == "certs"


def test_a_port_left_out_is_the_commands_choice_and_a_bad_one_is_refused() -> None:
    assert field_value(_args("deploy-local"), "network.port") is None
    with pytest.raises(FedpeftError, match="--port must be between 1 and 65535, got 70000"):
        local_section(_args("server", "--port", "70000"), "server", "network")


def test_required_flags_and_choices() -> None:
    with pytest.raises(SystemExit):
        _args("generate", "--user", "ann")  # --prompt is required
    a = _args("export", "--out", "o", "--which", "personal", "--merge")
    o = local_section(a, "export", "export")
    assert (o.out, o.which, o.merge, o.dtype) == ("o", "personal", True, "float32")
    with pytest.raises(FedpeftError, match="--which must be one of kept, personal, global, got 'x'"):
        local_section(_args("export", "--out", "o", "--which", "x"), "export", "export")


def test_eval_takes_the_trees_data_fields() -> None:
    a = _args("eval", "--task", "classify", "--block-size", "64", "--examples", "all")
    assert config_from_args(a, "eval").data.block_size == 64
    assert local_section(a, "eval", "eval").examples == "all"


def test_log_to_names_known_trackers_only() -> None:
    cfg = config_from_args(_args("simulate", "--log-to", "tensorboard,mlflow"), "simulate")
    assert cfg.federation.log_to == ("tensorboard", "mlflow")
    assert RunConfig().federation.log_to == ()
    with pytest.raises(FedpeftError, match="--log-to names trackers from tensorboard, mlflow; got wandb"):
        config_from_args(_args("simulate", "--log-to", "tensorboard,wandb"), "simulate")
