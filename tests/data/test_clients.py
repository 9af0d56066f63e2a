"""Clients made on demand: the same data however often remade, at most `keep` held, nothing per block kept."""

import gc
from pathlib import Path

import pytest
import torch

from fedpeft.config.tree import BaseConfig, DataConfig
from fedpeft.data.blocks import UserData
from fedpeft.data.clients import Clients, PackedBlocks
from fedpeft.data.partition import partition
from fedpeft.model.base import load_base
from tests.conftest import make_text


@pytest.fixture(scope="module")
def tokenizer(tiny_path: Path, cache_dir: str):
    return load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)).tokenizer


def _data(i: int) -> UserData:
    return UserData(f"u{i}", [torch.arange(i + 1)], [torch.arange(2)])


def test_made_when_asked_and_kept_within_limits() -> None:
    made: list[int] = []

    def make(i: int) -> UserData:
        made.append(i)
        return _data(i)

    clients = Clients([f"u{i}" for i in range(10)], make, [i + 1 for i in range(10)], keep=3)
    assert len(clients) == 10 and clients.held == 0 and made == []
    assert clients.tokens(4) == 5 and made == []  # the plan knows the tokens: nothing tokenized
    assert clients[2].user == "u2" and clients[-1].user == "u9" and made == [2, 9]
    clients[2]
    assert made == [2, 9]  # held: not made again
    for i in range(4, 8):
        clients[i]
    assert clients.held == 3 and made == [2, 9, 4, 5, 6, 7]
    assert torch.equal(clients[2].train[0], torch.arange(3)) and made[-1] == 2  # evicted, remade equal
    assert [d.user for d in clients[1:4]] == ["u1", "u2", "u3"] and clients.held == 3
    with pytest.raises(IndexError):
        clients[10]


def test_map_changes_each_client_and_counts_its_tokens_again() -> None:
    clients = Clients.of([_data(i) for i in range(4)])
    shorter = clients.map(lambda d: UserData(d.user, d.train[:0], d.eval))
    assert [shorter.tokens(i) for i in range(4)] == [0, 0, 0, 0]
    assert [clients.tokens(i) for i in range(4)] == [1, 2, 3, 4]
    assert shorter.users == clients.users


def test_packed_blocks_give_back_each_block() -> None:
    packed = PackedBlocks()
    packed.add([torch.tensor([5, 6, 7]), torch.tensor([~3, 4])])  # a task block's prompt ids are ~id
    packed.add([])
    packed.add([torch.tensor([9])])
    packed.close()
    got = packed.take([2, 0, 1])
    assert [b.tolist() for b in got] == [[9], [5, 6, 7], [~3, 4]] and all(b.dtype == torch.long for b in got)
    assert len(packed) == 3 and packed.tokens.dtype.itemsize == 4


def _tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("split", ["natural", "iid"])
def test_partition_keeps_no_tensor_per_block(tmp_path: Path, tokenizer, split: str) -> None:
    """Memory flat in the number of clients: partitioning keeps raw text (natural) or one packed array
    (iid), not the hundreds of block tensors it made on the way."""
    root = tmp_path / "users"
    root.mkdir()
    for i in range(40):
        (root / f"u{i:02d}.txt").write_text(make_text(i, 300))
    cfg = DataConfig(data=str(root), block_size=16)
    before = _tensors()
    clients = partition(cfg, tokenizer, 40 if split == "natural" else 20, split)
    assert clients.held == 0 and _tensors() - before <= 2  # at most a packed corpus's views
    blocks = sum(len(c.train) + len(c.eval) for c in clients)
    assert blocks > 400 and clients.held <= 64
    again = clients[3]
    assert clients.tokens(3) == again.train_tokens
    assert [b.tolist() for b in again.train] == [b.tolist() for b in list(clients)[3].train]
