"""Local training of the adapter on one device's text, and evaluation as loss and perplexity."""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from tqdm.auto import tqdm

from fedpeft.config.tree import TrainConfig
from fedpeft.data.blocks import UserData, collate, label_tokens
from fedpeft.log import Waiting, show_bars
from fedpeft.model.adapters import trainable_parameters
from fedpeft.model.memory import fit_model, release_heap
from fedpeft.model.placement import model_device, to_device
from fedpeft.model.precision import autocast

log = logging.getLogger(__name__)


def _hf(model: Any) -> Any:
    """The transformers model under a peft wrapper (adapter layers sit inside it, in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_checkpointing(model: Any, on: bool) -> bool:
    """Turn non-reentrant gradient checkpointing of the decoder layers on or off; returns the previous state.

    Checkpointed layers keep only their input in the forward pass and recompute the rest (frozen NF4
    matmuls, LoRA, attention) in the backward pass. transformers applies it only in training mode with
    grad enabled, so evaluation and generation run as before. Idempotent: a device toggles it around
    every round's train() on one resident model."""
    hf = _hf(model)
    before = any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())
    if on == before:
        return before
    if on and not getattr(hf, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; training without", type(hf).__name__)
        return before
    if on:  # transformers 5.24 renamed gradient_* to activation_* (the old names warn)
        if hasattr(hf, "activation_checkpointing_enable"):
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(hf, "activation_checkpointing_disable"):
        hf.activation_checkpointing_disable()
    else:
        hf.gradient_checkpointing_disable()
    return before


def _head_nll(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _FrozenHeadNLL(torch.autograd.Function):
    """Summed cross-entropy through a frozen bias-free linear output layer, `chunk` tokens at a time, whose
    gradient for the hidden states is computed in the forward pass: (softmax - onehot) @ W per chunk, the
    chunk's logits then dropped (the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024). Only
    that [tokens, hidden] gradient is kept for the backward pass, which scales it: no logits recomputed,
    the same two matmuls as with all logits at once. Under autocast the matmuls run as the layer's would."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for i in range(0, len(targets), chunk):
            y = targets[i : i + chunk]
            logits = torch.nn.functional.linear(hidden[i : i + chunk], weight)
            z = logits.float()
            lse = torch.logsumexp(z, dim=-1)
            total += (lse - z.gather(1, y[:, None]).squeeze(1)).sum()
            p = z.sub_(lse[:, None]).exp_()  # softmax, in place
            p[torch.arange(len(y), device=p.device), y] -= 1
            grad[i : i + chunk] = torch.matmul(p.to(logits.dtype), weight.to(logits.dtype))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None


def _frozen_linear(head: Any) -> bool:
    return (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
        and not (head._forward_hooks or head._forward_pre_hooks)
    )


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output layer) when the model's logits are exactly head(decoder(ids).last_hidden_state),
    else None (the caller falls back to full logits). The decoder and head are the modules under the peft
    wrapper, so adapter layers inside them (LoRA or IA3, lm_head included) apply. Checked once per model
    on 8 tokens: a model that post-processes its logits (softcapping, scaling) fails the check."""
    hf = _hf(model)
    try:
        decoder, head = hf.get_decoder(), hf.get_output_embeddings()
    except (AttributeError, ValueError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is hf:
        return None
    ok = getattr(hf, "_fedpeft_split_ok", None)
    if ok is None:
        ids = torch.arange(8, device=model_device(hf))[None] % hf.config.vocab_size
        training = hf.training
        hf.eval()
        try:
            with torch.no_grad():
                full = hf(input_ids=ids, use_cache=False).logits.float()
                split = head(decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
            ok = full.shape == split.shape and bool(torch.allclose(full, split, rtol=1e-3, atol=1e-3))
        except (TypeError, AttributeError) as e:  # a decoder that takes other arguments
            log.debug("chunked loss unavailable for %s: %s", type(hf).__name__, e)
            ok = False
        finally:
            hf.train(training)
        hf._fedpeft_split_ok = ok
    return (decoder, head) if ok else None


def causal_nll(model: Any, batch: dict[str, torch.Tensor], chunk: int) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over a batch's label tokens (labels shifted by one, -100 ignored)
    and how many there are; the sum over their count is Hugging Face's causal-LM loss.

    With `chunk` > 0 the decoder's last hidden states go through the output layer `chunk` label tokens at
    a time (padding dropped first), so at most one chunk of fp32 logits and its gradient exist at once
    instead of [batch, tokens, vocab] of them: a frozen output layer's gradient is taken in the forward
    pass (_FrozenHeadNLL); an adapted one's chunks are recomputed in the backward pass (non-reentrant
    torch.utils.checkpoint). chunk = 0, or a model whose logits are not head(hidden), computes all logits
    at once."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    n = int(keep.sum())
    if getattr(model, "_is_prompt_learning", False):
        return _prompt_learning_nll(model, batch, n)
    parts = _decoder_and_head(model) if chunk > 0 else None
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        )
        return nll, n
    decoder, head = parts
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1][keep]
    targets = labels[keep]
    if torch.is_grad_enabled() and _frozen_linear(head):
        return _FrozenHeadNLL.apply(hidden, head.weight, targets, chunk), n
    # an adapted output layer (LoRA on lm_head), or no grad: each chunk's logits recomputed in backward
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    fn = functools.partial(_head_nll, head)
    for i in range(0, n, chunk):
        h, y = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(fn, h, y, use_reentrant=False)
        else:
            total = total + fn(h, y)
    return total, n


def _prompt_learning_nll(model: Any, batch: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, int]:
    """Prompt and prefix tuning live in peft's own forward (virtual tokens before the input, or keys and
    values before every layer's), so the decoder cannot run alone: the whole forward with labels (peft
    masks the virtual positions), whose mean over the n label tokens, times n, is the sum. All logits at
    once: no chunking."""
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device), 0
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        use_cache=False,
    )
    return out.loss.float() * n, n


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy (nats) over all held-out tokens
    ppl: float
    tokens: int


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    seconds: float = 0.0  # in the optimizer steps
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
    compute: str,
    desc: str = "train",
    prox: tuple[float, list[torch.Tensor]] | None = None,
) -> TrainResult:
    """AdamW on the trainable adapter parameters only: each step is batch_size x grad_accum blocks, run
    as grad_accum micro-batches of batch_size, or with cfg.max_memory as the largest micro-batch that
    divides the step and fits that budget (fedpeft.model.memory.fit_model). The step's loss is the mean over
    all its label tokens, so splitting a step into micro-batches changes nothing but rounding.

    `prox=(lam, ref)` adds lam/2 * ||params - ref||^2 to the loss (Ditto's personal objective; `ref` holds
    one tensor per trainable parameter, in trainable_parameters order)."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("no trainable parameters: was the adapter injected?")
    if prox is not None and len(prox[1]) != len(params):
        raise ValueError(f"prox reference has {len(prox[1])} tensors for {len(params)} parameters")
    device = model_device(model)
    cfg = _fit_memory(cfg, model, data, compute, device)
    release_heap(cfg.compact_heap)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    stream = _block_stream(len(data.train), cfg.seed)
    result = TrainResult()
    # Prefix tuning hands every layer a cache holding the prefix's keys and values, which each forward
    # extends; a checkpointed layer's recompute would extend it twice. peft's prefix tuning trains without.
    prefix = getattr(getattr(model, "active_peft_config", None), "peft_type", None) == "PREFIX_TUNING"
    was_checkpointing = set_checkpointing(model, cfg.checkpointing and not prefix)
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not show_bars(cfg.progress), leave=False, unit="step")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)  # dropout masks
            for _ in bar:
                opt.zero_grad(set_to_none=True)
                blocks = [data.train[next(stream)] for _ in range(cfg.batch_size * cfg.grad_accum)]
                step_loss = _backward_step(model, params, device, blocks, cfg, pad_id, compute, prox, result)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                result.losses.append(step_loss)
                bar.set_postfix(loss=f"{step_loss:.3f}")
        result.seconds = time.perf_counter() - start
    finally:
        set_checkpointing(model, was_checkpointing)
        model.eval()
        release_heap(cfg.compact_heap)  # a device idles between rounds: return the freed activations
    return result


def _fit_memory(
    cfg: TrainConfig, model: Any, data: UserData, compute: str, device: torch.device
) -> TrainConfig:
    """`cfg` with the micro-batch that fits --max-memory (fedpeft.model.memory.fit_model), on CPU."""
    if cfg.max_memory and device.type != "cpu":  # a budget of this process's RSS: GPU memory is not in it
        log.warning("--max-memory sizes CPU training; on %s the micro-batch stays --batch-size", device.type)
    elif cfg.max_memory:
        cfg = fit_model(cfg, model, max(len(b) for b in data.train), cfg.max_memory, compute)
    return cfg


def _backward_step(
    model: Any,
    params: list[torch.Tensor],
    device: torch.device,
    blocks: list[torch.Tensor],
    cfg: TrainConfig,
    pad_id: int,
    compute: str,
    prox: tuple[float, list[torch.Tensor]] | None,
    result: TrainResult,
) -> float:
    """The gradients of one optimizer step over `blocks`, micro-batch by micro-batch; returns the step's loss
    and counts its tokens in `result`."""
    labelled = max(label_tokens(blocks), 1)  # label tokens in the whole step
    step_loss = 0.0
    for i in range(0, len(blocks), cfg.batch_size):
        batch = to_device(collate(blocks[i : i + cfg.batch_size], pad_id), device)
        with autocast(compute, device.type):
            nll, _ = causal_nll(model, batch, cfg.loss_chunk)
        loss = nll / labelled
        if prox is not None and i == 0:  # once per step
            lam, ref = prox
            loss = loss + lam / 2 * sum(((p - r) ** 2).sum() for p, r in zip(params, ref, strict=True))
        if loss.requires_grad:
            loss.backward()
        step_loss += loss.item()
        result.tokens += int(batch["attention_mask"].sum())
    return step_loss


@torch.no_grad()
def evaluate(
    model: Any,
    blocks: list[torch.Tensor],
    pad_id: int,
    compute: str,
    batch_size: int = 8,
    loss_chunk: int = TrainConfig.loss_chunk,
    desc: str = "evaluating",
    progress: bool = True,
) -> EvalResult:
    """Token-weighted mean next-token loss over held-out blocks (padding excluded), and exp of it; logits
    `loss_chunk` tokens at a time (0: all at once). A pass that takes more than a few seconds shows its
    progress (fedpeft.log.Waiting: a bar on a terminal, a line every ~30 s elsewhere)."""
    model.eval()
    device = model_device(model)
    nll, tokens = 0.0, 0
    total = label_tokens(blocks)
    with Waiting(desc, total, "tokens", enabled=progress) as wait:
        for i in range(0, len(blocks), batch_size):
            batch = to_device(collate(blocks[i : i + batch_size], pad_id), device)
            with autocast(compute, device.type):
                batch_nll, n = causal_nll(model, batch, loss_chunk)
            nll += batch_nll.item()
            tokens += n
            wait.update(n)
    loss = nll / max(tokens, 1)
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=tokens)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, compute: str) -> str:
    """Greedy continuation of `prompt` (deterministic, so outputs of two adapters compare directly)."""
    model.eval()
    device = model_device(model)
    ids = to_device(dict(tokenizer(prompt, return_tensors="pt")), device)
    with autocast(compute, device.type):
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
