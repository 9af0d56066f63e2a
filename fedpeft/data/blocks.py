"""A user's text or examples as token blocks: the train/held-out split, the blocks, and a batch of them.

Raw text is cut at the end into a held-out tail and tokenized in consecutive EOS-terminated blocks;
task examples become blocks through the chat template (fedpeft.data.chat), their prompt tokens stored
as ~id so collate() masks them out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.config.tree import DataConfig
from fedpeft.data.chat import TaskEval, merge_task_evals, task_eval
from fedpeft.data.chat import to_blocks as example_blocks
from fedpeft.data.users import UserText, find_user, load_users
from fedpeft.errors import FedpeftError, TooLittleData


def split_text(text: str, eval_fraction: float) -> tuple[str, str]:
    """Deterministic train/held-out split: the held-out part is the tail of the text, cut at whitespace
    so no word is split (a time-ordered split, as a device would see new text after training)."""
    text = text.strip()
    cut = int(len(text) * (1.0 - eval_fraction))
    space = text.rfind(" ", 0, cut)
    if space > 0:
        cut = space
    return text[:cut].strip(), text[cut:].strip()


def to_blocks(tokenizer: Any, text: str, block_size: int) -> list[torch.Tensor]:
    """Token ids in consecutive blocks of `block_size` (the last may be shorter), EOS-terminated."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [torch.tensor(ids[i : i + block_size], dtype=torch.long) for i in range(0, len(ids), block_size)]


@dataclass
class UserData:
    user: str
    train: list[torch.Tensor]  # token blocks (task data: answers as ids, the rest as ~id: fedpeft.data.chat)
    eval: list[torch.Tensor]
    task: TaskEval | None = None  # held-out examples for the task metrics; None: perplexity only
    truncated: int = 0  # examples longer than a block that lost prompt tokens ...
    dropped: int = 0  # ... or were left out
    # personal methods: the tail of the training blocks held back to choose global or personal
    # (fedpeft.personal.strategies.split_validation); no longer trained on
    val: list[torch.Tensor] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        return sum(len(b) for b in self.train)

    @property
    def eval_tokens(self) -> int:
        return sum(len(b) for b in self.eval)


def task_kind(cfg: DataConfig, user: UserText) -> str:
    """What evaluation measures for this corpus: --task, or auto: classify labeled examples, generate other
    examples' answers, perplexity of raw text."""
    if not user.examples:
        if cfg.task not in ("auto", "lm"):
            raise FedpeftError(
                f"--task {cfg.task} needs examples (prompt-completion or chat records); {cfg.data} is raw text"
            )
        return "lm"
    if cfg.task == "classify" and not user.labels:
        raise FedpeftError("--task classify needs labels: name their column with --label-column")
    if cfg.task == "auto":
        return "classify" if user.labels else "generate"
    return cfg.task


def _tokenize_examples(user: UserText, tokenizer: Any, cfg: DataConfig) -> UserData:
    """A user's examples in file order: the last --eval-fraction of them held out (at least one, as a
    device would meet new examples after training), capped at --eval-max-examples."""
    n = len(user.examples)
    held = max(1, round(n * cfg.eval_fraction))
    if n < cfg.min_examples or n - held < 1:
        raise TooLittleData(f"user {user.user!r} has too few examples ({n}; need {cfg.min_examples})")
    train, held_out = user.examples[:-held], user.examples[-held:][: cfg.eval_max_examples]
    fitted = example_blocks(tokenizer, train, cfg.block_size, cfg.too_long, cfg.packing)
    scored = example_blocks(tokenizer, held_out, cfg.block_size, cfg.too_long, False)
    if not fitted.blocks or not scored.blocks:
        raise TooLittleData(f"user {user.user!r} has no example that fits --block-size {cfg.block_size}")
    kind = task_kind(cfg, user)
    task = None if kind == "lm" else task_eval(tokenizer, held_out, kind, user.labels, cfg.block_size)
    return UserData(
        user.user,
        fitted.blocks,
        scored.blocks,
        task,
        fitted.truncated + scored.truncated,
        fitted.dropped + scored.dropped,
    )


def tokenize_user(user: UserText, tokenizer: Any, cfg: DataConfig) -> UserData:
    if user.examples:
        return _tokenize_examples(user, tokenizer, cfg)
    task_kind(cfg, user)  # refuses a task the text cannot have
    train_text, eval_text = split_text(user.text, cfg.eval_fraction)
    data = UserData(
        user.user,
        to_blocks(tokenizer, train_text, cfg.block_size),
        to_blocks(tokenizer, eval_text, cfg.block_size),
    )
    if data.train_tokens < cfg.min_train_tokens or data.eval_tokens < cfg.min_eval_tokens:
        raise TooLittleData(
            f"user {user.user!r} has too little text ({data.train_tokens} train / {data.eval_tokens} held-out tokens; "
            f"need {cfg.min_train_tokens} / {cfg.min_eval_tokens})"
        )
    if cfg.eval_max_tokens:
        data.eval = prefix(data.eval, cfg.eval_max_tokens)
    return data


def prefix(blocks: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """The first `tokens` tokens of `blocks` (the last block cut short where the cap falls inside it)."""
    out, left = [], tokens
    for b in blocks:
        if left <= 0:
            break
        out.append(b[:left])
        left -= len(out[-1])
    return out


def pooled(datas: list[UserData]) -> UserData:
    """Everyone's train blocks and everyone's held-out blocks together: the centralized baseline."""
    return UserData(
        "all",
        [b for d in datas for b in d.train],
        [b for d in datas for b in d.eval],
        merge_task_evals([d.task for d in datas if d.task is not None]),
        sum(d.truncated for d in datas),
        sum(d.dropped for d in datas),
    )


def fit_note(truncated: int, dropped: int, cfg: DataConfig) -> str:
    """'12 examples longer than --block-size 128 lost prompt tokens, 3 were dropped', or ''."""
    if not truncated and not dropped:
        return ""
    return (
        f"{truncated} example(s) longer than --block-size {cfg.block_size} lost prompt tokens from their start, "
        f"{dropped} were dropped (--too-long {cfg.too_long})"
    )


def load_user_data(cfg: DataConfig, tokenizer: Any, user: str) -> tuple[UserData, int]:
    """One user's data, or with user='all' every user's pooled; returns (data, users skipped for too little text)."""
    users = load_users(cfg)
    if user != "all":
        return tokenize_user(find_user(users, user), tokenizer, cfg), 0
    datas, skipped = [], 0
    for u in users:
        try:
            datas.append(tokenize_user(u, tokenizer, cfg))
        except TooLittleData:
            skipped += 1
    if not datas:
        raise FedpeftError(f"every user in {cfg.data} has too little text")
    return pooled(datas), skipped


def collate(blocks: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of blocks: input_ids/attention_mask [B, T]; labels [B, T] with -100 on padding
    and on a task block's prompt tokens (stored as ~id: fedpeft.data.chat)."""
    width = max(len(b) for b in blocks)
    ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), width), -100, dtype=torch.long)
    mask = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, b in enumerate(blocks):
        ids[i, : len(b)] = torch.where(b < 0, ~b, b)
        labels[i, : len(b)] = b.masked_fill(b < 0, -100)
        mask[i, : len(b)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_tokens(blocks: list[torch.Tensor]) -> int:
    """The tokens a batch of blocks is scored on: every next token of raw text, the answers of task data."""
    return sum(int((b[1:] >= 0).sum()) for b in blocks)
