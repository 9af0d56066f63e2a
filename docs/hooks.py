"""mkdocs hooks (mkdocs.yml `hooks:`): pages made when the site is built, so they cannot drift from their
source, and nothing is written into docs/:
- reference/config.md: the configuration reference, rendered from the config tree (fedpeft.config.reference);
- benchmarks.md: benchmarks/README.md as it is, the figures beside the scripts and results that measured them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

from fedpeft.config.reference import render


def on_files(files: Files, config: Any) -> Files:
    root = Path(config["config_file_path"]).parent
    files.append(File.generated(config, "reference/config.md", content=render()))
    benchmarks = (root / "benchmarks" / "README.md").read_text(encoding="utf-8")
    files.append(File.generated(config, "benchmarks.md", content=benchmarks))
    return files
