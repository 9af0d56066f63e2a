"""Examples through the base's own chat template (the one `fedpeft serve` answers with), as token blocks
whose loss covers only the answers.

A block is one int64 tensor: an answer token is its id, any other token (system, user, the template's
markup) is stored as ~id (= -id - 1, always negative), so the mask travels with the ids through every
split, slice and pickle; fedpeft.data.blocks.collate turns it into input ids and labels with -100. An example is
never split across blocks: one that is too long loses prompt tokens from its start, or is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.data.records import Example
from fedpeft.errors import FedpeftError


def render(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str = ""
) -> list[int]:
    """Token ids of a chat as the template writes it (the template adds any special tokens itself). A chat
    the template refuses (roles out of order, a system turn it does not take) is a one-line error."""
    if not getattr(tokenizer, "chat_template", None):
        raise FedpeftError(
            "the base model has no chat template: task data needs one (--format text trains on raw text)"
        )
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja's TemplateError, or the template's raise_exception()
        raise FedpeftError(
            f"{where or 'a chat'}: the chat template refuses it ({str(e).splitlines()[0]})"
        ) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def example_ids(tokenizer: Any, ex: Example) -> tuple[list[int], list[bool]]:
    """The chat's ids and which of them are answers: each assistant turn's span is what the template adds
    between the chat up to it (with the generation prompt) and the chat including it, its end-of-turn
    token included so the model learns to stop. A template that rewrites earlier turns (one that drops
    past reasoning) is refused: its spans would not line up."""
    full = render(tokenizer, ex.as_dicts(), False, ex.where)
    answer = [False] * len(full)
    for i, (role, _) in enumerate(ex.messages):
        if role != "assistant":
            continue
        before = render(tokenizer, ex.as_dicts(i), True, ex.where)
        upto = render(tokenizer, ex.as_dicts(i + 1), False, ex.where)
        start = len(before)
        # both must be prefixes of the whole chat's ids, or the span would sit on the wrong tokens
        if full[: len(upto)] != upto or upto[:start] != before:
            raise FedpeftError(f"{ex.where}: the chat template renders turns differently in a longer chat")
        answer[start : len(upto)] = [True] * (len(upto) - start)
    return full, answer


def encode(ids: Sequence[int], answer: Sequence[bool]) -> torch.Tensor:
    t = torch.tensor(ids, dtype=torch.long)
    return torch.where(torch.tensor(answer, dtype=torch.bool), t, ~t)


def decode(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, answer mask) of a block."""
    answer = block >= 0
    return torch.where(answer, block, ~block), answer


@dataclass
class Fitted:
    """Examples as blocks, and what did not fit as it was."""

    blocks: list[torch.Tensor] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0


def to_blocks(
    tokenizer: Any, examples: Sequence[Example], block_size: int, too_long: str, packing: bool
) -> Fitted:
    """Each example as one block (or, packing, consecutive examples sharing one: attention crosses them,
    as TRL's packing does); an example longer than `block_size` keeps its answers and loses prompt tokens
    from its start (`too_long="truncate"`), or is dropped when that is not enough or with "drop"."""
    out = Fitted()
    pending: list[torch.Tensor] = []
    for ex in examples:
        ids, answer = example_ids(tokenizer, ex)
        cut = len(ids) - block_size
        if cut > 0:
            if too_long == "drop" or True in answer[:cut]:
                out.dropped += 1
                continue
            ids, answer, out.truncated = ids[cut:], answer[cut:], out.truncated + 1
        block = encode(ids, answer)
        if not packing:
            out.blocks.append(block)
        elif sum(len(b) for b in pending) + len(block) > block_size:
            out.blocks.append(torch.cat(pending))
            pending = [block]
        else:
            pending.append(block)
    if pending:
        out.blocks.append(torch.cat(pending))
    return out


@dataclass
class TaskEval:
    """A client's held-out examples as the task metrics need them (fedpeft.training.task_metrics)."""

    kind: str  # "classify" or "generate"
    prompts: list[list[int]]  # the chat up to the answer, with the generation prompt
    answers: list[str]  # the reference answer (generate)
    gold: list[int]  # the label's index (classify)
    labels: tuple[str, ...] = ()
    options: list[list[int]] = field(default_factory=list)  # each label's answer tokens, end of turn included


def label_options(tokenizer: Any, labels: Sequence[str]) -> list[list[int]]:
    """Each label as the template writes an assistant's answer: the tokens after the generation prompt."""
    chat = [{"role": "user", "content": "?"}]
    prompt = render(tokenizer, chat, True)
    out = []
    for label in labels:
        full = render(tokenizer, [*chat, {"role": "assistant", "content": label}], False)
        if full[: len(prompt)] != prompt:
            raise FedpeftError("the chat template renders an answer differently from its generation prompt")
        out.append(full[len(prompt) :])
    return out


def end_of_turn(tokenizer: Any) -> str:
    """The text the template writes after an assistant's answer ('<|im_end|>' for ChatML), stripped; where
    that is not the tokenizer's end-of-text, a greedy answer is cut there."""
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "X"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    return text[text.rindex("X") + 1 :].strip()


def task_eval(
    tokenizer: Any, examples: Sequence[Example], kind: str, labels: Sequence[str], max_prompt: int
) -> TaskEval:
    """Held-out examples for scoring: prompts cut from their start to `max_prompt` tokens."""
    prompts = [render(tokenizer, ex.as_dicts(-1), True, ex.where)[-max_prompt:] for ex in examples]
    gold = (
        [labels.index(ex.label) if ex.label in labels else -1 for ex in examples]
        if kind == "classify"
        else []
    )
    options = label_options(tokenizer, labels) if kind == "classify" else []
    return TaskEval(kind, prompts, [ex.answer for ex in examples], gold, tuple(labels), options)


def merge_task_evals(parts: Sequence[TaskEval]) -> TaskEval | None:
    """Several clients' held-out examples as one (the centralized baseline's)."""
    if not parts:
        return None
    first = parts[0]
    return TaskEval(
        first.kind,
        [p for t in parts for p in t.prompts],
        [a for t in parts for a in t.answers],
        [g for t in parts for g in t.gold],
        first.labels,
        first.options,
    )
