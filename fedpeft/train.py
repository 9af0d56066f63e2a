"""Local training of the adapter on one device's text, and evaluation as loss and perplexity."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from fedpeft.adapters import trainable_parameters
from fedpeft.config import TrainConfig
from fedpeft.data import UserData, collate


def autocast_for(quant: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for every quantized/bf16 base: the frozen matmuls already run in bf16 and the
    fp32 adapter matmuls follow (avx512_bf16 CPUs do bf16 ~4x faster than fp32). 'none' stays fp32."""
    if quant == "none":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy (nats) over all held-out tokens
    ppl: float
    tokens: int


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    seconds: float = 0.0
    tokens: int = 0  # tokens seen (non-padding)


def _block_stream(n: int, seed: int):
    """Indices of training blocks, reshuffled every epoch with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=g).tolist()


def train(
    model: Any,
    data: UserData,
    cfg: TrainConfig,
    lr: float,
    pad_id: int,
    quant: str,
    desc: str = "train",
    prox: tuple[float, list[torch.Tensor]] | None = None,
) -> TrainResult:
    """AdamW on the trainable adapter parameters only; `cfg.grad_accum` micro-batches per step.

    `prox=(lam, ref)` adds lam/2 * ||params - ref||^2 to the loss (Ditto's personal objective; `ref` holds
    one tensor per trainable parameter, in trainable_parameters order)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("no trainable parameters: was the adapter injected?")
    if prox is not None and len(prox[1]) != len(params):
        raise ValueError(f"prox reference has {len(prox[1])} tensors for {len(params)} parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    stream = _block_stream(len(data.train), cfg.seed)
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, leave=False, unit="step")
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # dropout masks
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = collate([data.train[next(stream)] for _ in range(cfg.batch_size)], pad_id)
                with autocast_for(quant):
                    loss = model(**batch).loss
                if prox is not None:
                    lam, ref = prox
                    loss = loss + lam / 2 * sum(
                        ((p - r) ** 2).sum() for p, r in zip(params, ref, strict=True)
                    )
                loss = loss / cfg.grad_accum
                loss.backward()
                step_loss += loss.item()
                result.tokens += int(batch["attention_mask"].sum())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            result.losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


@torch.no_grad()
def evaluate(
    model: Any, blocks: list[torch.Tensor], pad_id: int, quant: str, batch_size: int = 8
) -> EvalResult:
    """Token-weighted mean next-token loss over held-out blocks (padding excluded), and exp of it."""
    model.eval()
    nll, tokens = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = collate(blocks[i : i + batch_size], pad_id)
        with autocast_for(quant):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        tokens += int((labels != -100).sum())
    loss = nll / max(tokens, 1)
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=tokens)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, quant: str) -> str:
    """Greedy continuation of `prompt` (deterministic, so outputs of two adapters compare directly)."""
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with autocast_for(quant):
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
