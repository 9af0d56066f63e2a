"""Files that pip packages ship (the default model and data), found without importing the package: the
model's package imports llama_cpp, which fedpeft does not install, and the data's imports half of SciPy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedpeft.errors import FedpeftError


def packaged_file(package: str, file: str, what: str, install: str) -> Path:
    """`file` inside the installed `package`, or a one-line error saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedpeftError(f"the default {what} is not installed: {install}")
    path = Path(spec.submodule_search_locations[0]) / file
    if not path.is_file():
        raise FedpeftError(f"the default {what} file is missing: {path}")
    return path
