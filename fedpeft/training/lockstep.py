"""Several clients' local training in lockstep: their micro-batches stacked through one base forward and
backward, each client's rows through its own adapter (fedpeft.model.multi), so the frozen base's work is
shared while everything that makes a client's training its own stays its own: its adapter, its AdamW state,
its gradient clipping, its data order, its number of steps and its loss (the mean over its own label
tokens). Rows of a causal LM do not interact, so each client's gradients are those it computes alone (up to
float rounding): `train_many` equals `fedpeft.training.local.train` client by client (tests/training).

What it leaves to the sequential path (`supports` says): prompt and prefix tuning (they act on the input),
a proximal term (Ditto's personal objective), a --max-memory micro-batch search, LoRA dropout (its masks
would be drawn for the stack, not per client).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpeft.config.tree import AdapterConfig, TrainConfig
from fedpeft.data.blocks import UserData, collate, label_tokens
from fedpeft.model.adapters import adapter_off, trains
from fedpeft.model.memory import release_heap
from fedpeft.model.multi import PER_ROW, MultiAdapter
from fedpeft.model.placement import model_device, to_device
from fedpeft.model.precision import autocast
from fedpeft.training.local import (
    TrainResult,
    _block_stream,
    _decoder_and_head,
    _frozen_linear,
    _FrozenHeadNLL,
    _head_nll,
    _hf,
    set_checkpointing,
)


@dataclass
class ClientRun:
    """One client's training: where its adapter starts (peft's keys), its data, seed and steps."""

    start: dict[str, np.ndarray]
    data: UserData
    seed: int
    steps: int
    result: TrainResult = field(default_factory=TrainResult)
    trained: dict[str, np.ndarray] = field(default_factory=dict)


def supports(model: Any, cfg: AdapterConfig, train: TrainConfig) -> str | None:
    """Why these clients must train one after another, or None when they can train in lockstep."""
    if cfg.kind not in PER_ROW:
        return f"{cfg.kind} adapters are not in the batched operator"
    if cfg.lora_sb:
        return "Fed-SB's r x r matrix is not in the batched operator"
    if cfg.kind == "lora" and cfg.dropout > 0:
        return "LoRA dropout draws its masks for the whole stack, not per client"
    if train.max_memory:
        return "--max-memory sizes one client's micro-batch"
    if model_device(model).type not in ("cpu", "cuda"):
        return f"{model_device(model).type} is not supported"
    return None


def train_many(
    model: Any,
    runs: list[ClientRun],
    cfg: AdapterConfig,
    train: TrainConfig,
    lr: float,
    pad_id: int,
    compute: str,
) -> None:
    """Train every run's adapter in lockstep on the peft model `model` (whose own adapter is switched off
    meanwhile); fills each run's `result` and `trained` (peft's keys, float32)."""
    hf = _hf(model)
    multi = MultiAdapter(hf)
    device = model_device(model)
    release_heap(train.compact_heap)
    names = [f"client{i}" for i in range(len(runs))]
    tensors, opts = [], []
    try:
        for name, run in zip(names, runs, strict=True):
            t = _client_tensors(run.start, cfg, device)
            multi.add(name, cfg, t)
            trainable = [v for v in t.values() if v.requires_grad]
            tensors.append(t)
            opts.append(torch.optim.AdamW(trainable, lr=lr, weight_decay=train.weight_decay))
        _loop(model, multi, names, runs, tensors, opts, train, pad_id, compute, device)
    finally:
        multi.unwrap()
        release_heap(train.compact_heap)
    for run, t in zip(runs, tensors, strict=True):
        run.trained = {k: v.detach().float().cpu().numpy() for k, v in t.items()}


def _client_tensors(
    start: dict[str, np.ndarray], cfg: AdapterConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in start.items():
        t = torch.tensor(np.asarray(value, dtype=np.float32), device=device)
        t.requires_grad_(trains(key, cfg))  # as for the peft model: FFA-LoRA keeps A at its shared init
        out[key] = t
    return out


def _loop(
    model: Any,
    multi: MultiAdapter,
    names: list[str],
    runs: list[ClientRun],
    tensors: list[dict[str, torch.Tensor]],
    opts: list[torch.optim.Optimizer],
    train: TrainConfig,
    pad_id: int,
    compute: str,
    device: torch.device,
) -> None:
    streams = [_block_stream(len(run.data.train), run.seed) for run in runs]
    # checked on a one-row forward: before any rows are assigned
    parts = _decoder_and_head(model) if train.loss_chunk > 0 else None
    was = set_checkpointing(model, train.checkpointing)
    model.train()
    start = time.perf_counter()
    try:
        with adapter_off(model):
            for step in range(max(run.steps for run in runs)):
                live = [i for i, run in enumerate(runs) if step < run.steps]
                for i in live:
                    opts[i].zero_grad(set_to_none=True)
                blocks = {
                    i: [
                        runs[i].data.train[next(streams[i])]
                        for _ in range(train.batch_size * train.grad_accum)
                    ]
                    for i in live
                }
                losses = _backward_step(
                    model, parts, multi, names, blocks, train, pad_id, compute, device, runs
                )
                for i in live:
                    params = [v for v in tensors[i].values() if v.requires_grad]
                    if train.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                    opts[i].step()
                    runs[i].result.losses.append(losses[i])
    finally:
        set_checkpointing(model, was)
        model.eval()
    seconds = time.perf_counter() - start
    total = sum(run.steps for run in runs)
    for run in runs:  # the stack's time, shared out by steps
        run.result.seconds = seconds * run.steps / max(total, 1)


def _backward_step(
    model: Any,
    parts: tuple[Any, Any] | None,
    multi: MultiAdapter,
    names: list[str],
    blocks: dict[int, list[torch.Tensor]],
    train: TrainConfig,
    pad_id: int,
    compute: str,
    device: torch.device,
    runs: list[ClientRun],
) -> dict[int, float]:
    """One optimizer step's gradients for every live client, micro-batch by micro-batch: micro-batch j of
    every client stacked into one forward; each client's loss is its sum over its step's label tokens."""
    labelled = {i: max(label_tokens(b), 1) for i, b in blocks.items()}
    losses = dict.fromkeys(blocks, 0.0)
    for j in range(0, train.batch_size * train.grad_accum, train.batch_size):
        rows, owners = [], []
        for i, b in blocks.items():
            part = b[j : j + train.batch_size]
            rows += part
            owners += [i] * len(part)
        batch = to_device(collate(rows, pad_id), device)
        with multi.rows_of([names[i] for i in owners]), autocast(compute, device.type):
            nll = _row_nll(model, parts, batch, owners, train.loss_chunk)
            loss = sum(nll[i] / labelled[i] for i in nll)
            if loss.requires_grad:
                loss.backward()
        for i in nll:
            losses[i] += float(nll[i].detach()) / labelled[i]
        for i, b in blocks.items():
            runs[i].result.tokens += int(sum(len(x) for x in b[j : j + train.batch_size]))
    return losses


def _row_nll(
    model: Any, parts: tuple[Any, Any] | None, batch: dict[str, torch.Tensor], owners: list[int], chunk: int
) -> dict[int, torch.Tensor]:
    """Each client's summed next-token cross-entropy over its rows of the batch: the decoder once for all
    rows, the output layer client by client (chunked as fedpeft.training.local.causal_nll does)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = batch["labels"][:, 1:]
    owner = torch.tensor(owners, device=ids.device)
    out: dict[int, torch.Tensor] = {}
    if parts is None:
        logits = _hf(model)(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        for i in dict.fromkeys(owners):
            sel = owner == i
            out[i] = torch.nn.functional.cross_entropy(
                logits[sel].reshape(-1, logits.shape[-1]), labels[sel].reshape(-1), reduction="sum"
            )
        return out
    decoder, head = parts
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
    for i in dict.fromkeys(owners):
        sel = owner == i
        keep = labels[sel] != -100
        h, y = hidden[sel][keep], labels[sel][keep]
        out[i] = _head_sum(head, h, y, chunk)
    return out


def _head_sum(head: Any, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    if torch.is_grad_enabled() and _frozen_linear(head):
        return _FrozenHeadNLL.apply(hidden, head.weight, targets, chunk)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for k in range(0, len(targets), chunk):
        h, y = hidden[k : k + chunk], targets[k : k + chunk]
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_head_nll, head, h, y, use_reentrant=False)
        else:
            total = total + _head_nll(head, h, y)
    return total


def group_that_fits(model: Any, train: TrainConfig, block_len: int, compute: str, wanted: int) -> int:
    """The most clients (at most `wanted`) whose stacked micro-batches' activations fit in 80% of the memory
    free now (the CPU's available memory, or the GPU's), by fedpeft.model.memory's estimate."""
    from fedpeft.model.memory import Shape, peak_mib

    device = model_device(model)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _available_bytes()
    if free is None:
        return wanted
    shape = Shape.of(_hf(model).config)
    act = 4 if compute == "fp32" else 2
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def extra(k: int) -> float:  # MiB on top of what the process holds with no client training
        tokens = k * train.batch_size * block_len
        args = (train.checkpointing, train.loss_chunk, train.compact_heap, act)
        return peak_mib(shape, 0, params * k, tokens, *args) - peak_mib(shape, 0, 0, 0, *args)

    k = wanted
    while k > 1 and extra(k) > 0.8 * free / 2**20:
        k -= 1
    return k


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), max(size, 1)):
        yield items[i : i + size]
