"""Task examples as token blocks through the chat template: which tokens are scored, truncation, packing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedpeft.data.blocks import collate
from fedpeft.data.chat import example_ids, label_options, task_eval, to_blocks
from fedpeft.data.records import Example
from fedpeft.model.tiny import _byte_tokenizer

END = "<|im_end|>\n"  # the tiny template's end of turn, learned with every answer


@pytest.fixture(scope="module")
def tok() -> Any:
    return _byte_tokenizer()


def _pc(prompt: str, answer: str, label: str | None = None) -> Example:
    return Example((("user", prompt), ("assistant", answer)), label, "test")


def _rendered(ex: Example) -> str:
    """The tiny ChatML template written out by hand, so the test does not trust the template engine."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in ex.messages)


def _collated(tok: Any, ex: Example, block_size: int = 512) -> tuple[list[int], list[int]]:
    """One example through to_blocks and collate: (input ids, labels) of its single block."""
    fitted = to_blocks(tok, [ex], block_size, "truncate", False)
    assert len(fitted.blocks) == 1
    batch = collate(fitted.blocks, tok.pad_token_id)
    return batch["input_ids"][0].tolist(), batch["labels"][0].tolist()


def _answer_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of scored tokens (labels != -100), checking each scored label is its input id."""
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels, strict=True):
        scored = lab != -100
        if scored:
            assert lab == i
            if not prev:
                runs.append([])
            runs[-1].append(lab)
        prev = scored
    return runs


def test_prompt_completion_scores_only_the_answer_and_its_end_of_turn(tok: Any) -> None:
    """The labels are exactly the completion + end of turn; the inputs are the whole rendered chat."""
    ex = _pc("What is 2+2? Answer briefly.", "four")
    ids, labels = _collated(tok, ex)
    assert tok.decode(ids) == _rendered(ex)
    runs = _answer_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["four" + END]
    # the scored span is the tail of the block: nothing after the answer
    assert labels[-len(runs[0]) :] == runs[0]
    assert sum(lab != -100 for lab in labels) == len(("four" + END).encode())


def test_two_turn_chat_scores_both_assistant_turns(tok: Any) -> None:
    """In system/user/assistant/user/assistant, each assistant turn (and only it) is scored, in order."""
    ex = Example(
        (
            ("system", "You are terse."),
            ("user", "Capital of France?"),
            ("assistant", "Paris"),
            ("user", "And of Italy?"),
            ("assistant", "Rome, of course"),
        )
    )
    ids, labels = _collated(tok, ex)
    assert tok.decode(ids) == _rendered(ex)
    runs = _answer_runs(ids, labels)
    assert [tok.decode(r) for r in runs] == ["Paris" + END, "Rome, of course" + END]
    # the unscored tokens are the system and user turns and the template markup
    prompt = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab == -100])
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_example_ids_mask_matches_collate(tok: Any) -> None:
    """The block stores prompt tokens as ~id: collate's labels agree with example_ids' answer mask."""
    ex = _pc("hi", "ok")
    ids, answer = example_ids(tok, ex)
    block = to_blocks(tok, [ex], 512, "truncate", False).blocks[0]
    assert bool((block[torch.tensor(answer)] >= 0).all())
    assert bool((block[~torch.tensor(answer)] < 0).all())
    batch = collate([block], tok.pad_token_id)
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == [i if a else -100 for i, a in zip(ids, answer, strict=True)]


def test_collate_pads_with_no_label(tok: Any) -> None:
    """A short block in a batch is right-padded: pad ids, attention 0 and label -100 past its end."""
    short, long = _pc("a", "b"), _pc("a much longer prompt than the other one", "b")
    blocks = to_blocks(tok, [short, long], 512, "truncate", False).blocks
    n = len(blocks[0])
    batch = collate(blocks, tok.pad_token_id)
    width = len(blocks[1])
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0, n:].tolist() == [-100] * (width - n)
    assert batch["input_ids"][0, n:].tolist() == [tok.pad_token_id] * (width - n)


def test_too_long_example_loses_prompt_from_its_start(tok: Any) -> None:
    """Truncation keeps the last block_size tokens: the whole answer, the prompt's tail."""
    ex = _pc("BEGIN " + "x" * 200 + " tail", "the answer")
    full = len(_rendered(ex).encode())
    block_size = 100
    assert full > block_size
    fitted = to_blocks(tok, [ex], block_size, "truncate", False)
    assert (fitted.truncated, fitted.dropped, len(fitted.blocks)) == (1, 0, 1)
    block = fitted.blocks[0]
    assert len(block) == block_size
    batch = collate([block], tok.pad_token_id)
    text = tok.decode(batch["input_ids"][0].tolist())
    assert text == _rendered(ex)[-block_size:]
    assert text.endswith(" tail<|im_end|>\n<|im_start|>assistant\nthe answer" + END)
    assert "BEGIN" not in text and "user" not in text
    runs = _answer_runs(batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
    assert [tok.decode(r) for r in runs] == ["the answer" + END]


def test_too_long_example_is_dropped_with_drop(tok: Any) -> None:
    """too_long='drop' leaves a too-long example out and counts it; one that fits is kept."""
    long, short = _pc("x" * 300, "yes"), _pc("q", "no")
    fitted = to_blocks(tok, [long, short], 100, "drop", False)
    assert (fitted.truncated, fitted.dropped, len(fitted.blocks)) == (0, 1, 1)
    assert tok.decode(collate(fitted.blocks, 0)["input_ids"][0].tolist()) == _rendered(short)


def test_answer_longer_than_block_is_dropped_even_when_truncating(tok: Any) -> None:
    """An answer that cannot fit is never cut: the example is dropped under 'truncate' too."""
    ex = _pc("q", "y" * 120)
    fitted = to_blocks(tok, [ex], 100, "truncate", False)
    assert (fitted.truncated, fitted.dropped, fitted.blocks) == (0, 1, [])


def test_answer_exactly_filling_the_block_is_kept(tok: Any) -> None:
    """The boundary: an answer (with end of turn) of exactly block_size tokens keeps only the answer."""
    answer = "z" * 40
    ex = _pc("some prompt", answer)
    size = len((answer + END).encode())
    fitted = to_blocks(tok, [ex], size, "truncate", False)
    assert (fitted.truncated, fitted.dropped) == (1, 0)
    assert fitted.blocks[0].tolist() == tok(answer + END, add_special_tokens=False)["input_ids"]


def test_packing_shares_blocks_without_splitting_examples(tok: Any) -> None:
    """Packed blocks hold several whole examples, none over block_size, with the same answer tokens."""
    examples = [_pc(f"question {i} " + "w" * (i % 5), f"answer {i}") for i in range(12)]
    block_size = 200
    plain = to_blocks(tok, examples, block_size, "truncate", False)
    packed = to_blocks(tok, examples, block_size, "truncate", True)
    assert len(plain.blocks) == 12 and plain.truncated == plain.dropped == 0
    assert (packed.truncated, packed.dropped) == (0, 0)
    assert len(packed.blocks) < len(plain.blocks)
    assert all(len(b) <= block_size for b in packed.blocks)
    assert any(len(b) > max(len(p) for p in plain.blocks) for b in packed.blocks)  # really shared
    # the same tokens in the same order: each example whole, in one block
    assert torch.equal(torch.cat(packed.blocks), torch.cat(plain.blocks))
    assert sum(int((b >= 0).sum()) for b in packed.blocks) == sum(int((b >= 0).sum()) for b in plain.blocks)
    lengths = [len(b) for b in plain.blocks]
    bounds = {sum(lengths[:k]) for k in range(len(lengths) + 1)}
    ends = [sum(len(b) for b in packed.blocks[: k + 1]) for k in range(len(packed.blocks))]
    assert all(e in bounds for e in ends)  # each packed block ends where an example ends
    for b in packed.blocks:  # and each starts at an example's start
        text = tok.decode(collate([b], 0)["input_ids"][0].tolist())
        assert text.startswith("<|im_start|>user\nquestion ")
        assert text.endswith(END)


def test_label_options_are_each_label_and_end_of_turn(tok: Any) -> None:
    """Each label option is the label's tokens + end of turn: exactly what training scores for it."""
    labels = ["negative", "positive"]
    options = label_options(tok, labels)
    assert [tok.decode(o) for o in options] == [lab + END for lab in labels]
    for label, option in zip(labels, options, strict=True):
        ids, labs = _collated(tok, _pc("Is it good?", label, label))
        assert _answer_runs(ids, labs) == [option]


def test_task_eval_prompts_gold_and_options(tok: Any) -> None:
    """Held-out examples become prompts ending in the generation prompt, gold label indices, options."""
    held = [_pc("first review " + "r" * 60, "positive", "positive"), _pc("second", "negative", "negative")]
    te = task_eval(tok, held, "classify", ("negative", "positive"), 64)
    assert te.gold == [1, 0]
    assert te.answers == ["positive", "negative"]
    assert te.options == label_options(tok, ["negative", "positive"])
    assert tok.decode(te.prompts[1]) == "<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n"
    full = "<|im_start|>user\nfirst review " + "r" * 60 + "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(te.prompts[0]) == full[-64:]  # cut from the start to max_prompt
    gen = task_eval(tok, held, "generate", (), 64)
    assert gen.gold == [] and gen.options == []
