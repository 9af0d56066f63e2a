from pathlib import Path

import pytest
import torch

from fedpeft.config.tree import BaseConfig, DataConfig
from fedpeft.data.blocks import collate, load_user_data, split_text, to_blocks, tokenize_user
from fedpeft.data.users import load_users
from fedpeft.errors import FedpeftError
from fedpeft.model.base import load_base


@pytest.fixture(scope="module")
def tokenizer(tiny_path: Path, cache_dir: str):
    return load_base(BaseConfig(model="tiny", quant="none", cache_dir=cache_dir)).tokenizer


def test_folder_users_are_sorted_and_stable(users_dir: Path) -> None:
    users = load_users(str(users_dir))
    assert [u.user for u in users] == ["alice", "bob", "carol"]
    carol = users[2].text
    assert (
        carol
        == (users_dir / "carol" / "a.txt").read_text() + "\n" + (users_dir / "carol" / "b.txt").read_text()
    )
    assert [u.user for u in load_users(str(users_dir))] == [u.user for u in users]


def test_default_corpus_has_one_user_per_speaker() -> None:
    users = load_users("default")
    assert len(users) == 181
    assert {u.label for u in users} == {"democrat", "republican"}
    assert len({u.user for u in users}) == 181


def test_split_is_deterministic_tail_without_cut_words() -> None:
    text = " ".join(f"w{i}" for i in range(1000))
    train, held = split_text(text, 0.2)
    assert (train, held) == split_text(text, 0.2)
    assert train + " " + held == text
    assert 0.15 < len(held) / len(text) < 0.25
    assert held.startswith("w")


def test_blocks_cover_every_token(tokenizer) -> None:
    text = "hello world " * 50
    blocks = to_blocks(tokenizer, text, 32)
    ids = torch.cat(blocks).tolist()
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(b) == 32 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 32


def test_collate_pads_and_masks_labels() -> None:
    batch = collate([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]


def test_empty_data_folder(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match="no user data"):
        load_users(str(tmp_path))


def test_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(FedpeftError, match="does not exist"):
        load_users(str(tmp_path / "nope"))


def test_user_with_too_little_text(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "terse.txt").write_text("hi there")
    user = load_users(str(tmp_path))[0]
    with pytest.raises(FedpeftError, match="too little text"):
        tokenize_user(user, tokenizer, DataConfig(data=str(tmp_path)))


def test_unknown_user(users_dir: Path, tokenizer) -> None:
    with pytest.raises(FedpeftError, match="no user 'dave'"):
        load_user_data(DataConfig(data=str(users_dir)), tokenizer, "dave")


def test_all_pools_users_and_skips_terse_ones(users_dir: Path, tokenizer) -> None:
    (users_dir / "terse.txt").write_text("hi")
    cfg = DataConfig(data=str(users_dir), block_size=64)
    pooled, skipped = load_user_data(cfg, tokenizer, "all")
    singles = [load_user_data(cfg, tokenizer, u)[0] for u in ("alice", "bob", "carol")]
    assert skipped == 1
    assert pooled.train_tokens == sum(s.train_tokens for s in singles)
    assert pooled.eval_tokens == sum(s.eval_tokens for s in singles)


def test_a_binary_file_named_txt_is_refused_naming_it(users_dir: Path) -> None:
    pdf = b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nstream\n\x00\x9c\xff\x10\x00\x00\x87endstream\n"
    (users_dir / "dave.txt").write_bytes(pdf)
    with pytest.raises(FedpeftError, match=r"dave.txt is not text \(it holds NUL bytes"):
        load_users(str(users_dir))
    (users_dir / "dave.txt").write_bytes(bytes(range(128, 256)) * 20)  # no NUL, but no text either
    with pytest.raises(FedpeftError, match=r"dave.txt is not text \(2560 of 2560 characters"):
        load_users(str(users_dir))


def test_latin1_text_is_read_with_a_warning_that_counts_what_was_replaced(
    users_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (users_dir / "eve.txt").write_bytes("Le café était déjà fermé.\r\nÀ demain.\n".encode("latin-1"))
    with caplog.at_level("WARNING", logger="fedpeft"):
        users = {u.user: u.text for u in load_users(str(users_dir))}
    assert users["eve"] == "Le caf\ufffd \ufffdtait d\ufffdj\ufffd ferm\ufffd.\n\ufffd demain.\n"
    (warning,) = [r.getMessage() for r in caplog.records if "eve.txt" in r.getMessage()]
    assert "not valid UTF-8: 6 undecodable" in warning
    assert not any("alice.txt" in r.getMessage() for r in caplog.records)  # clean UTF-8: no word


def test_the_held_out_cap_keeps_a_fixed_prefix(users_dir: Path, tokenizer) -> None:
    """--eval-max-tokens: the first T held-out tokens, whole blocks then the cut one; 0 keeps all."""
    from dataclasses import replace

    from fedpeft.data.blocks import prefix

    user = load_users(str(users_dir))[0]
    full = tokenize_user(user, tokenizer, DataConfig(block_size=8, eval_max_tokens=0))
    capped = tokenize_user(user, tokenizer, replace(DataConfig(block_size=8), eval_max_tokens=13))
    assert full.eval_tokens > 13 and capped.eval_tokens == 13
    assert [len(b) for b in capped.eval] == [8, 5]
    assert torch.equal(torch.cat(capped.eval), torch.cat(full.eval)[:13])
    assert capped.train_tokens == full.train_tokens  # training text untouched
    everything = prefix(full.eval, 10**9)
    assert len(everything) == len(full.eval) and all(
        torch.equal(a, b) for a, b in zip(everything, full.eval, strict=True)
    )
    assert prefix(full.eval, 0) == []
