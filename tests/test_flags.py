"""The command line is generated from the config tree: every entry refuses the same bad value alike."""

import argparse
from pathlib import Path

import pytest

from fedpeft.config import FEDERATION, RunConfig, fields
from fedpeft.config_io import dumps_toml, from_run_config, load_toml, to_run_config
from fedpeft.errors import FedpeftError
from fedpeft.flags import add_config_flags, config_from_args


def _parse(command: str, *argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, command)
    return config_from_args(parser.parse_args(list(argv)), command)


@pytest.mark.parametrize("command", ["train", *FEDERATION])
def test_every_offered_field_has_its_flag_and_no_flag_means_the_default(command: str) -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser, command)
    options = {s for a in parser._actions for s in a.option_strings}
    wanted = {f.meta["flag"] for f in fields() if f.meta["flag"] and command in f.commands}
    assert wanted <= options
    assert config_from_args(parser.parse_args([]), command) == RunConfig()


def test_flags_set_the_fields_and_shared_flags_set_all_of_theirs() -> None:
    cfg = _parse(
        "simulate", "--rounds", "3", "--seed", "7", "--no-progress", "--secagg", "--targets", "q_proj,v_proj"
    )
    assert cfg.federation.rounds == 3 and cfg.federation.secagg and not cfg.train.progress
    assert cfg.federation.seed == cfg.train.seed == cfg.adapter.seed == 7
    assert cfg.adapter.target_modules == ("q_proj", "v_proj")
    with pytest.raises(SystemExit):  # only the train command has --steps
        _parse("simulate", "--steps", "3")


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounds = 2\nclients = 6\n")
    cfg = _parse("simulate", "--config", str(path), "--rounds", "4")
    assert cfg.federation.rounds == 4 and cfg.federation.clients == 6
    path.write_text("[federation]\nsecagg = true\nclients = 6\n")
    assert _parse("simulate", "--config", str(path)).federation.secagg
    assert not _parse("simulate", "--config", str(path), "--no-secagg").federation.secagg


def test_a_bad_value_gives_the_same_line_from_every_entry(tmp_path: Path) -> None:
    lines = []
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nfraction = 2.5\n")
    for attempt in (
        lambda: _parse("simulate", "--fraction", "2.5"),
        lambda: load_toml(path),
        lambda: from_run_config({**to_run_config(RunConfig()), "federation.fraction": 2.5}),
        lambda: from_run_config({"federation.fraction": "2.5"}),  # Flower's --run-config strings
    ):
        with pytest.raises(FedpeftError) as e:
            attempt()
        lines.append(str(e.value))
    assert lines == ["--fraction must be in (0, 1], got 2.5"] * 4


def test_print_config_output_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fedpeft.cli import main

    assert (
        main(
            ["simulate", "--print-config", "--adapter", "ia3", "--rounds", "2", "--secagg", "--clients", "6"]
        )
        == 0
    )
    path = tmp_path / "printed.toml"
    path.write_text(capsys.readouterr().out)
    cfg = load_toml(path)
    assert cfg == _parse("simulate", "--adapter", "ia3", "--rounds", "2", "--secagg", "--clients", "6")
    assert dumps_toml(cfg) == path.read_text()
