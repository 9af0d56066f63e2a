"""Shared fixtures: a tiny Llama built once per session in a temp cache, and tiny user folders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "while",
    "a",
    "small",
    "bird",
    "sings",
    "about",
    "rivers,",
    "mountains",
    "and",
    "the",
    "long",
    "road",
    "home;",
]


def make_text(seed: int, words: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_path(cache_dir: str) -> Path:
    from fedpeft.model.tiny import build_tiny

    return build_tiny(cache_dir)


@pytest.fixture
def users_dir(tmp_path: Path) -> Path:
    """Three users: two as single files, one as a folder of files."""
    root = tmp_path / "users"
    root.mkdir()
    (root / "alice.txt").write_text(make_text(1, 400))
    (root / "bob.txt").write_text(make_text(2, 300))
    (root / "carol").mkdir()
    (root / "carol" / "a.txt").write_text(make_text(3, 200))
    (root / "carol" / "b.txt").write_text(make_text(4, 200))
    return root
