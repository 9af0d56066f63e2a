"""The configuration reference (docs site, reference/config.md) is rendered from the tree at build time by
docs/hooks.py; these check that the rendering covers every field and stays a well-formed Markdown table."""

from __future__ import annotations

import re
from pathlib import Path

from fedpeft.config.local import local_fields
from fedpeft.config.reference import render
from fedpeft.config.tree import fields

ROOT = Path(__file__).resolve().parents[2]


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| `")]


def test_every_field_has_one_row_with_its_key_flag_and_section() -> None:
    # the run config's fields, then the options a single command takes (a device's, serve's, ...)
    text = render()
    rows, every = _rows(text), fields() + local_fields()
    assert len(rows) == len(every)
    for f, row in zip(every, rows, strict=True):
        assert row.startswith(f"| `{f.key}` | ")
        assert (f"`{f.meta['flag']}`" if f.meta["flag"] else " | - | ") in row
    for section in dict.fromkeys(f.section for f in every):
        assert f"## `[{section}]`" in text


def test_each_row_has_five_cells_whatever_its_help_holds() -> None:
    # an unescaped | in a help text (Ditto's ||v - w||^2) would split a cell and shift the table
    for row in _rows(render()):
        cells = re.split(r"(?<!\\)\|", row)[1:-1]
        assert len(cells) == 5, row


def test_a_shared_flag_points_to_the_field_that_carries_its_help() -> None:
    row = next(r for r in _rows(render()) if r.startswith("| `federation.seed` |"))
    assert "`train.seed`" in row


def test_the_site_builds_the_page_from_the_tree() -> None:
    assert "from fedpeft.config.reference import render" in (ROOT / "docs" / "hooks.py").read_text()
    assert "reference/config.md" in (ROOT / "mkdocs.yml").read_text()
