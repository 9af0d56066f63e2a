"""The command line is generated from the config tree: every entry refuses the same bad value alike."""

import argparse
from pathlib import Path

import pytest

from fedpeft.config.files import dumps_toml, from_run_config, load_toml, to_run_config
from fedpeft.config.flags import add_config_flags, config_from_args
from fedpeft.config.tree import FEDERATION, RunConfig, fields
from fedpeft.errors import FedpeftError


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


@pytest.mark.parametrize(
    "flag,key,text,line",
    [
        ("--fraction", "federation.fraction", "2.5", "--fraction must be in (0, 1], got 2.5"),
        ("--quant", "base.quant", "x", "--quant must be one of auto, none, bf16, int8, nf4, got 'x'"),
        ("--rounds", "federation.rounds", "2.5", "--rounds must be an integer, got '2.5'"),
        ("--lr", "train.lr", "fast", "--lr must be a number, got 'fast'"),
    ],
)
def test_a_bad_value_gives_the_same_line_from_every_entry(
    tmp_path: Path, flag: str, key: str, text: str, line: str
) -> None:
    section, name = key.split(".")
    path = tmp_path / "c.toml"
    path.write_text(f'[{section}]\n{name} = "{text}"\n')
    lines = []
    for attempt in (
        lambda: _parse("simulate", flag, text),
        lambda: load_toml(path),
        lambda: from_run_config({**to_run_config(RunConfig()), key: text}),  # Flower's --run-config strings
    ):
        with pytest.raises(FedpeftError) as e:
            attempt()
        lines.append(str(e.value))
    assert lines == [line] * 3


def test_a_file_is_checked_together_with_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nmin_clients = 12\n")
    assert _parse("simulate", "--config", str(path), "--clients", "20").federation.min_clients == 12
    with pytest.raises(FedpeftError, match="--min-clients 12 exceeds --clients 10"):
        _parse("simulate", "--config", str(path))


def test_a_seed_in_a_file_is_the_one_seed_and_two_different_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nseed = 5\n")
    cfg = _parse("simulate", "--config", str(path))
    assert cfg.federation.seed == cfg.train.seed == cfg.adapter.seed == 5
    assert _parse("simulate", "--config", str(path), "--seed", "6").adapter.seed == 6
    path.write_text("[federation]\nseed = 5\n[train]\nseed = 6\n")
    with pytest.raises(FedpeftError, match=r"federation.seed are one option \(--seed\) but differ"):
        _parse("simulate", "--config", str(path))


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
