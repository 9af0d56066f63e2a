"""`fedpeft generate`'s layout: columns on a wide terminal, labelled blocks otherwise."""

import pytest


def test_generate_prints_columns_on_a_wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import shutil
    import sys

    from fedpeft.serve.generate import side_by_side

    outputs = [("base", "one two three " * 8), ("global", "four"), ("personal", "five six")]
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback: os.terminal_size((130, 40)))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    lines = side_by_side(outputs).strip("\n").splitlines()
    assert lines[0].split(" | ")[0].strip() == "base" and len(lines) > 3
    assert all(line.count(" | ") == 2 for line in lines)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert "--- personal ---\nfive six" in side_by_side(outputs)
