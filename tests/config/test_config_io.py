"""Config files, Flower's run config and pyproject.toml's [tool.flwr.app] all come from the one tree."""

import tomllib
from pathlib import Path

import pytest

from fedpeft.config.files import (
    APP_KEYS,
    dumps_toml,
    flwr_app_table,
    from_run_config,
    load_toml,
    overrides,
    to_run_config,
)
from fedpeft.config.tree import AdapterConfig, FederationConfig, RunConfig, TrainConfig
from fedpeft.errors import FedpeftError

ROOT = Path(__file__).resolve().parents[2]
CHANGED = RunConfig(
    adapter=AdapterConfig(kind="ia3", target_modules=("k_proj", "v_proj")),
    train=TrainConfig(lr=1e-3, progress=False),
    federation=FederationConfig(rounds=7, secagg=True, clients=6),
)


def test_a_printed_config_loads_back_to_the_same_config(tmp_path: Path) -> None:
    for cfg in (RunConfig(), CHANGED):
        path = tmp_path / "c.toml"
        path.write_text(dumps_toml(cfg))
        assert load_toml(path) == cfg
        path.write_text(dumps_toml(cfg, only_changed=True))
        assert load_toml(path) == cfg


def test_a_file_is_layered_over_a_start_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[federation]\nrounds = 2\n")
    cfg = load_toml(path, start=CHANGED)
    assert cfg.federation.rounds == 2 and cfg.federation.clients == 6 and cfg.adapter.kind == "ia3"


@pytest.mark.parametrize(
    "text,match",
    [
        ("[federation]\nroundz = 2\n", "unknown key 'federation.roundz' in"),
        ("rounds = 2\n", "options belong in a table such as [federation]"),
        ("[federation]\nrounds = 'two'\n", "--rounds must be an integer, got 'two'"),
        ("[federation]\nrounds = 2.5\n", "--rounds must be an integer, got 2.5"),
        ("[federation]\nsecagg = 'maybe'\n", "--secagg must be true or false"),
        ("[federation]\nfraction = 2.5\n", "--fraction must be in (0, 1], got 2.5"),
        ("[federation\n", "is not valid TOML"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_flag(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(FedpeftError) as e:
        load_toml(path)
    assert match in str(e.value) and "\n" not in str(e.value)


def test_a_missing_file() -> None:
    with pytest.raises(FedpeftError, match="does not exist"):
        load_toml(Path("/nonexistent/c.toml"))


def test_overrides_are_what_differs_from_the_defaults() -> None:
    assert overrides(RunConfig()) == {}
    assert overrides(CHANGED) == {
        "adapter.kind": "ia3",
        "adapter.target_modules": "k_proj,v_proj",
        "train.lr": 1e-3,
        "train.progress": False,
        "federation.clients": 6,
        "federation.rounds": 7,
        "federation.secagg": True,
    }
    assert from_run_config(overrides(CHANGED)) == CHANGED


def test_pyproject_flower_app_is_the_tree_defaults() -> None:
    """`flwr run .` reads [tool.flwr.app.config]: it must be the tree's defaults (regenerate it with
    `python -m fedpeft.config.files` when this fails)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app == flwr_app_table()
    from flwr.common.config import flatten_dict

    flat = flatten_dict(app["config"])  # as Flower hands it to the ServerApp
    assert {k: flat.pop(k) for k in APP_KEYS} == APP_KEYS
    assert flat == to_run_config(RunConfig()) and from_run_config(flat) == RunConfig()


@pytest.mark.parametrize("checkout", [True, False], ids=["source-checkout", "installed-wheel"])
def test_the_app_fedpeft_server_launches_builds_as_a_flower_app(tmp_path: Path, checkout: bool) -> None:
    """`fedpeft server` runs `flwr run APP`: the project itself in a source checkout, a folder with the same
    [tool.flwr.app] otherwise; Flower must be able to build either into a FAB."""
    from flwr.cli.build import build_fab_from_disk

    from fedpeft.deploy.server import app_dir

    app = app_dir(tmp_path / "app", root=ROOT if checkout else tmp_path / "no-such-checkout")
    assert app == (ROOT if checkout else tmp_path / "app")
    built = tomllib.loads((app / "pyproject.toml").read_text())
    assert built["tool"]["flwr"]["app"] == flwr_app_table()
    assert len(build_fab_from_disk(app)) < 100_000  # the apps come from the installed fedpeft, not the FAB
