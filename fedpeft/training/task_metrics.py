"""Task metrics for an adapted model, on token ids (the caller's template and tokenizer make the task):
multiple choice scored as lm-evaluation-harness does (summed log-probability of each option, `acc` = argmax),
greedy short answers for SQuAD exact match and ROUGE-L, and classification counts that sum across clients."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from itertools import groupby
from typing import Any

import torch

from fedpeft.data.chat import TaskEval, end_of_turn
from fedpeft.federation.task_counts import ClassCounts
from fedpeft.federation.task_eval import PREFIX
from fedpeft.model.placement import model_device, to_device
from fedpeft.model.precision import autocast


def _by_length(lengths: list[int], batch_size: int, same_length: bool = False) -> list[list[int]]:
    """Indices in batches of similar length (longest first), so a batch carries little padding; the
    caller puts results back by index, so the order the sequences were given in is kept. `same_length`:
    only equal lengths share a batch (no padding at all)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    runs = [list(g) for _, g in groupby(order, key=lengths.__getitem__)] if same_length else [order]
    return [run[i : i + batch_size] for run in runs for i in range(0, len(run), batch_size)]


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def score_options(
    model: Any,
    prompts: list[list[int]],
    options: list[list[int]],
    compute: str,
    batch_size: int = 8,
    pad_id: int = 0,
) -> list[list[float]]:
    """out[i][j]: the summed log-probability of options[j]'s tokens after prompts[i] (teacher forcing on
    prompt + option), lm-evaluation-harness's multiple-choice score. Right padding changes no score: a
    causal model's real positions never attend to the padding after them. An empty option scores 0."""
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (the first option token is scored after it)")
    model.eval()
    device = model_device(model)
    # (prompt, option) pairs flattened: pair k is prompt k // len(options), option k % len(options)
    seqs = [p + o for p in prompts for o in options]
    starts = [len(p) for p in prompts for _ in options]
    flat = [0.0] * len(seqs)
    for batch in _by_length([len(s) for s in seqs], batch_size):
        inputs = to_device(_pad([seqs[k] for k in batch], pad_id, left=False), device)
        with autocast(compute, device.type):
            logits = model(**inputs, use_cache=False).logits
        # prompt tuning puts its virtual tokens' logits first: [B, virtual + T, vocab]
        logits = logits[:, -inputs["input_ids"].shape[1] :]
        for row, k in enumerate(batch):
            start, end = starts[k], len(seqs[k])
            if end == start:
                continue
            # only the option's positions go to fp32: a full [B, T, vocab] log-softmax would not be needed
            logp = torch.log_softmax(logits[row, start - 1 : end - 1].float(), dim=-1)
            target = inputs["input_ids"][row, start:end]
            flat[k] = float(logp.gather(-1, target[:, None]).sum())
    n = len(options)
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def _greedy_new_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    compute: str,
    batch_size: int,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """The greedy continuation of each prompt as token ids, cut at the first end-of-text."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    model.eval()
    device = model_device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # the template's end of turn ends an answer too, where it is a token of its own other than end-of-text
    ends = [eos, *(i for i in stop_ids if i != eos)]
    settings = dict(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=ends
    )
    out: list[list[int]] = [[] for _ in prompts]
    # peft puts prompt tuning's virtual tokens (prefix tuning's keys and values) before the left padding and
    # ignores position ids, so padding would move the prompt away from them and change the answer (prefix
    # tuning's first logits by more than their spread on the tiny model): those batch equal lengths only
    exact = getattr(model, "_is_prompt_learning", False)
    for batch in _by_length([len(p) for p in prompts], batch_size, same_length=exact):
        # left padding: every prompt ends at the last column, where generation appends
        inputs = to_device(_pad([prompts[k] for k in batch], pad, left=True), device)
        with autocast(compute, device.type):
            seqs = model.generate(**inputs, **settings)
        for row, k in enumerate(batch):
            new = seqs[row, inputs["input_ids"].shape[1] :].tolist()
            # a row that finished before the others is filled with padding after its end-of-text
            cut = min((new.index(e) for e in ends if e in new), default=len(new))
            out[k] = new[:cut]
    return out


def greedy_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    compute: str,
    batch_size: int = 8,
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """Greedy (deterministic) answers to token-id prompts, batched with left padding; the same answers as
    decoding each prompt alone. An answer ends at end-of-text or at one of `stop_ids`. Only the new tokens
    are decoded, special tokens dropped, whitespace stripped."""
    new = _greedy_new_ids(model, tokenizer, prompts, max_new_tokens, compute, batch_size, stop_ids)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, ref: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(ref))


_ROUGE: Any = None


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure of `pred` against `ref` (rouge_score; its tokenizer lowercases and keeps [a-z0-9])."""
    global _ROUGE
    if _ROUGE is None:  # built once: rouge_score's import and scorer set-up cost more than a score
        from rouge_score import rouge_scorer  # rouge_score (nltk, absl): only --task generate needs it

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return float(_ROUGE.score(ref, pred)["rougeL"].fmeasure)


def classify(
    model: Any,
    tokenizer_pad_id: int,
    prompts: list[list[int]],
    options: list[list[int]],
    gold: list[int],
    compute: str,
    batch_size: int = 8,
) -> ClassCounts:
    """Counts for predicting, per prompt, the option with the highest score_options score (ties: the
    lowest index, as max() keeps the first)."""
    if len(gold) != len(prompts):
        raise ValueError(f"{len(gold)} gold labels for {len(prompts)} prompts")
    counts = ClassCounts.zeros(len(options))
    scores = score_options(model, prompts, options, compute, batch_size, tokenizer_pad_id)
    for row, g in zip(scores, gold, strict=True):
        counts.add(max(range(len(row)), key=row.__getitem__), g)
    return counts


def score(model: Any, tokenizer: Any, task: TaskEval, compute: str, answer_tokens: int, batch_size: int,
          prefix: str = PREFIX) -> dict[str, float]:  # fmt: skip
    """The model (as it is: adapter on, off, global or personal) on one client's held-out examples: the counts
    the server pools (fedpeft.federation.task_eval)."""
    if task.kind == "classify":
        counts = classify(
            model, tokenizer.pad_token_id, task.prompts, task.options, task.gold, compute, batch_size
        )
        return counts.to_metrics(prefix)
    stop = end_of_turn(tokenizer)  # a token of its own (ChatML's <|im_end|> in Qwen) or plain text
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
    answers = greedy_answers(
        model, tokenizer, task.prompts, answer_tokens, compute, batch_size, ids[:1] if len(ids) == 1 else []
    )
    answers = [a.split(stop)[0].strip() if stop else a for a in answers]
    return {
        f"{prefix}n": float(len(answers)),
        f"{prefix}em": sum(exact_match(a, r) for a, r in zip(answers, task.answers, strict=True)),
        f"{prefix}rouge_l": sum(rouge_l(a, r) for a, r in zip(answers, task.answers, strict=True)),
    }
