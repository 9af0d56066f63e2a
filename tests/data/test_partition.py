from pathlib import Path

import pytest
import torch

from fedpeft.config.tree import BaseConfig, DataConfig
from fedpeft.data.partition import partition
from fedpeft.errors import FedpeftError
from fedpeft.model.base import load_base
from tests.conftest import make_text


@pytest.fixture(scope="module")
def tokenizer(tiny_path: Path, cache_dir: str):
    return load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)).tokenizer


@pytest.fixture
def labelled_dir(tmp_path: Path) -> Path:
    root = tmp_path / "users"
    root.mkdir()
    for i in range(6):
        (root / f"u{i}.txt").write_text(make_text(i, 150 + 50 * i))
    return root


def _tokens(clients) -> int:
    return sum(c.train_tokens + c.eval_tokens for c in clients)


def test_natural_takes_the_users_with_most_text(labelled_dir: Path, tokenizer) -> None:
    clients = partition(DataConfig(data=str(labelled_dir), block_size=32), tokenizer, 3)
    assert [c.user for c in clients] == ["u3", "u4", "u5"]


def test_natural_with_too_few_users(labelled_dir: Path, tokenizer) -> None:
    with pytest.raises(FedpeftError, match="only 6 users"):
        partition(DataConfig(data=str(labelled_dir)), tokenizer, 7)


def test_iid_deals_every_block_once_and_is_seeded(labelled_dir: Path, tokenizer) -> None:
    cfg = DataConfig(data=str(labelled_dir), block_size=32)
    clients = partition(cfg, tokenizer, 4, "iid", seed=1)
    everyone = partition(cfg, tokenizer, 6)
    assert _tokens(clients) == _tokens(everyone)
    sizes = [len(c.train) for c in clients]
    assert max(sizes) - min(sizes) <= 1
    again = partition(cfg, tokenizer, 4, "iid", seed=1)
    assert all(torch.equal(a.train[0], b.train[0]) for a, b in zip(clients, again, strict=True))
    assert [c.user for c in clients] == ["iid-000", "iid-001", "iid-002", "iid-003"]


def test_dirichlet_skews_labels_on_the_default_corpus(tokenizer) -> None:
    cfg = DataConfig(block_size=128)
    skewed = partition(cfg, tokenizer, 5, "dirichlet", alpha=0.1, seed=0)
    assert _tokens(skewed) == _tokens(partition(cfg, tokenizer, 5, "iid"))
    assert len({len(c.train) for c in skewed}) > 1


def test_dirichlet_needs_labels(labelled_dir: Path, tokenizer) -> None:
    with pytest.raises(FedpeftError, match="labelled"):
        partition(DataConfig(data=str(labelled_dir)), tokenizer, 2, "dirichlet")


def test_dirichlet_redraws_until_no_client_is_empty(tokenizer) -> None:
    """Two labels, alpha 0.1, ten clients: single draws starve some clients; the split draws again."""
    import numpy as np

    cfg = DataConfig(block_size=128)
    rng = np.random.default_rng([0, 1234])
    first = rng.dirichlet(np.full(10, 0.1))
    assert (first < 1e-3).sum() >= 3  # what one draw looks like: most clients with (almost) nothing
    clients = partition(cfg, tokenizer, 10, "dirichlet", alpha=0.1, seed=0)
    assert all(c.train and c.eval for c in clients)
    sizes = sorted(c.train_tokens for c in clients)
    assert sizes[-1] > 20 * sizes[0]  # still strongly skewed


def test_more_iid_clients_than_blocks_is_one_clear_error(labelled_dir: Path, tokenizer) -> None:
    cfg = DataConfig(data=str(labelled_dir), block_size=128)
    blocks = sum(len(c.eval) for c in partition(cfg, tokenizer, 6))
    with pytest.raises(FedpeftError, match=r"clients get no text under the iid split .*use fewer --clients$"):
        partition(cfg, tokenizer, blocks + 1, "iid")
