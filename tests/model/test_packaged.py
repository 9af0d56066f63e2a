"""Packaged files (the default model and data) are found without importing their package."""

import pytest

from fedpeft.errors import FedpeftError
from fedpeft.packaged import packaged_file


def test_found_missing_package_and_missing_file() -> None:
    assert packaged_file("fedpeft", "cli.py", "model", "pip install x").name == "cli.py"
    with pytest.raises(FedpeftError, match="the default model is not installed: pip install nothing-here"):
        packaged_file("no_such_package_here", "m.gguf", "model", "pip install nothing-here")
    with pytest.raises(FedpeftError, match="the default data file is missing: .*no-such.csv"):
        packaged_file("fedpeft", "no-such.csv", "data", "pip install x")
