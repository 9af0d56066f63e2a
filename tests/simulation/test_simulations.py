"""Every ready federation in simulations/ loads, validates and is documented in the README."""

from pathlib import Path

import pytest

from fedpeft.config.files import load_toml
from fedpeft.config.tree import RunConfig

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted((ROOT / "simulations").glob("*.toml"))


def test_the_ready_federations_are_there() -> None:
    names = {p.stem for p in FILES}
    wanted = {
        "default",
        "ia3",
        "ffa-fedadam",
        "dirichlet",
        "secagg",
        "personalize-finetune",
        "personalize-fedsa",
    }
    assert wanted | {"scale-tiny"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_each_file_loads_validates_and_is_documented(path: Path) -> None:
    cfg = load_toml(path)  # validates
    assert f"simulations/{path.name}" in (ROOT / "README.md").read_text()
    if path.stem == "default":
        assert cfg == RunConfig(), "default.toml is the main command's federation"
    else:
        assert cfg != RunConfig()
