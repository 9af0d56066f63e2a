"""How much memory a device's training process needs, and the micro-batch that fits a budget (--max-memory).

The budget is the whole training process's peak resident memory: Python, torch and the libraries, the
frozen base, the adapter with its gradients and AdamW state, and the activations of one micro-batch.
Only the last part shrinks with the micro-batch, so fit_micro_batch() picks the largest micro-batch that
divides the step's batch (batch_size x grad_accum) and fits; train() runs the step as that many
micro-batches with gradient accumulation, which changes nothing but rounding.

The estimate is a model calibrated by measurement (benchmarks/memory.py --calibrate: a fresh process per
setting, its peak RSS from the kernel's VmHWM), with margins so that it overestimates; see peak_mib().
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

from fedpeft.config.tree import TrainConfig
from fedpeft.errors import FedpeftError
from fedpeft.model.quant import parameter_count

MIB = 2**20

# glibc serves allocations above its mmap threshold with their own mappings, returned to the system when
# freed; below it they come from heaps that keep freed memory. Its default threshold grows to 32 MiB as
# large blocks are freed, so activations end up in the heaps, fragment them, and the process keeps them.
# A fixed threshold keeps the peak down, but below 1 MiB the [tokens, hidden] bf16 activations of the
# default model at batch 4 x 128 get mappings of their own too, and faulting their pages in at every
# allocation makes the step far slower. So training runs with 1 MiB (FAST_HEAP: a lower peak at no cost in
# step time), and with 128 KiB (COMPACT_HEAP, TrainConfig.compact_heap) only where --max-memory needs it: it
# is also what makes the peak follow the micro-batch. The thresholds measured: benchmarks/README.md, "Memory".
FAST_HEAP = 1024 * 1024
COMPACT_HEAP = 128 * 1024
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc (musl, macOS): nothing to tune
    return libc


def release_heap(compact: bool = False) -> None:
    """Fix glibc's mmap threshold (FAST_HEAP, or COMPACT_HEAP: see above) and hand the heaps' free memory
    back to the system. Process-wide; a no-op without glibc. Cheap (milliseconds); train() calls it before
    and after training."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, COMPACT_HEAP if compact else FAST_HEAP)
        libc.malloc_trim(0)


# The model, in MiB, for a process that trains an adapter on a base of B MiB (Base.nbytes) with P adapter
# parameters, t = micro-batch x block length tokens per micro-batch, bf16 activations (fp32: twice):
#
#   peak = RUNTIME + BASE_FACTOR * B + margin * (TRAIN_FIXED + P * ADAPTER_BYTES + head + t * per_token)
#   per_token = layers * hidden * 2 + (hidden + intermediate) * LAYER_BYTES       checkpointing
#             = layers * (hidden + intermediate) * LAYER_BYTES                      without
#   head      = min(loss_chunk, t) * vocab * CHUNK_BYTES, or t * vocab * LOGIT_BYTES per token for loss_chunk 0
#   margin    = COMPACT_MARGIN with the compact heap, FAST_MARGIN with the fast one (its fragmentation)
#
# The constants are fitted to benchmarks/memory.py --calibrate (the peak RSS of a fresh process per model,
# setting and micro-batch): RUNTIME and TRAIN_FIXED to the tiny model, whose training part hardly depends on
# the batch; LAYER_BYTES, LOGIT_BYTES and CHUNK_BYTES to the default model's differences between settings
# (with and without checkpointing, all logits or a chunk); BASE_FACTOR to its bases in NF4, bf16 and fp32.
# Each is rounded up and the margins lie above the worst row, so that the estimate overestimates. The
# calibration's rows and what each constant was fitted to: benchmarks/README.md, "Memory".
# tests/model/test_memory.py checks that the estimate covers the default rows.
RUNTIME_MIB = 408.0  # python, torch, transformers, peft, bitsandbytes, tokenizer and data (tiny, loaded)
BASE_FACTOR = 1.5  # the loaded base in RSS per byte of its tensors, up to the load's peak
TRAIN_FIXED_MIB = 42.0  # autograd, optimizer and thread-pool overhead of any training step (tiny)
ADAPTER_BYTES = 16.0  # per trainable parameter: its gradient, AdamW's two moments, clipping temporaries
LAYER_BYTES = 14.0  # per (hidden + intermediate) unit per token of one layer's saved activations
LOGIT_BYTES = 12.0  # per vocab entry per token with all logits at once
CHUNK_BYTES = 6.0  # per vocab entry per token of the one chunk of logits alive
COMPACT_MARGIN = 1.25  # on the training part: above the most the compact heap measured over the model
FAST_MARGIN = 2.2  # the fast heap's fragmentation: above the most it measured (not monotone in the batch)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder that activations scale with."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        def first(*names: str) -> int | None:
            return next((int(v) for n in names if (v := getattr(config, n, None)) is not None), None)

        layers = first("num_hidden_layers", "n_layer", "num_layers")
        hidden = first("hidden_size", "n_embd", "d_model")
        vocab = first("vocab_size")
        if layers is None or hidden is None or vocab is None:
            raise FedpeftError(
                f"--max-memory cannot estimate the memory of a {type(config).__name__} (its layer count, "
                "hidden size or vocabulary is not in its config); train without it"
            )
        return cls(layers, hidden, first("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden, vocab)


def peak_mib(
    shape: Shape,
    base_bytes: int,
    adapter_params: int,
    tokens: int,
    checkpointing: bool,
    loss_chunk: int,
    compact_heap: bool,
    act_bytes: int = 2,
) -> float:
    """Estimated peak RSS (MiB) of a process training `tokens` tokens per micro-batch (see the model above);
    act_bytes 2 for bf16 activations (every quantized or bf16 base under autocast), 4 for fp32."""
    width = (shape.hidden + shape.intermediate) * LAYER_BYTES * act_bytes / 2
    if checkpointing:
        per_token = shape.layers * shape.hidden * act_bytes + width
    else:
        per_token = shape.layers * width
    if loss_chunk > 0:
        head = min(loss_chunk, tokens) * shape.vocab * CHUNK_BYTES
    else:
        head, per_token = 0.0, per_token + shape.vocab * LOGIT_BYTES
    training = TRAIN_FIXED_MIB * MIB + adapter_params * ADAPTER_BYTES + head + tokens * per_token
    margin = COMPACT_MARGIN if compact_heap else FAST_MARGIN
    return RUNTIME_MIB + BASE_FACTOR * base_bytes / MIB + margin * training / MIB


class BudgetTooSmall(FedpeftError):
    """--max-memory below what training needs at micro-batch 1; `need_mib` is that need."""

    def __init__(self, message: str, need_mib: int) -> None:
        super().__init__(message)
        self.need_mib = need_mib


def _fit(
    cfg: TrainConfig,
    shape: Shape,
    base_bytes: int,
    adapter_params: int,
    block_len: int,
    budget_mib: float,
    act_bytes: int,
) -> TrainConfig:
    batch = cfg.batch_size * cfg.grad_accum
    micros = [m for m in range(batch, 0, -1) if batch % m == 0]
    for compact in (False, True):  # the fast heap if any micro-batch fits it, the largest that does
        for m in micros:
            args = (m * block_len, cfg.checkpointing, cfg.loss_chunk, compact, act_bytes)
            if peak_mib(shape, base_bytes, adapter_params, *args) <= budget_mib:
                return dataclasses.replace(cfg, batch_size=m, grad_accum=batch // m, compact_heap=compact)
    need = peak_mib(
        shape, base_bytes, adapter_params, block_len, cfg.checkpointing, cfg.loss_chunk, True, act_bytes
    )
    raise BudgetTooSmall(
        f"--max-memory {budget_mib:g} MiB is too small for this model and block length: the smallest "
        f"budget that works is {math.ceil(need)} MiB (micro-batch 1)",
        math.ceil(need),
    )


def fit_micro_batch(
    train_cfg: TrainConfig, base: Any, adapter_params: int, block_len: int, budget_mib: float
) -> TrainConfig:
    """`train_cfg` with batch_size (the micro-batch), grad_accum and compact_heap replaced so that the batch
    (batch_size x grad_accum) stays and the training process's estimated peak RSS stays within
    `budget_mib`: the largest micro-batch that divides the batch and fits with the fast heap, else the
    largest that fits with the compact one (slower steps). The estimate covers the whole process (runtime,
    `base` as loaded: a fedpeft.model.base.Base, its nbytes and model.config; an adapter of `adapter_params`
    trainable parameters; `block_len` tokens per sequence) under train_cfg's checkpointing and loss_chunk.
    A budget no micro-batch fits raises FedpeftError naming the smallest one that does. Pure: a device can
    check its --max-memory once at start, before any round."""
    act_bytes = 4 if base.compute == "fp32" else 2
    return _fit(
        train_cfg, Shape.of(base.model.config), base.nbytes, adapter_params, block_len, budget_mib, act_bytes
    )


def base_bytes_of(model: Any) -> int:
    """Bytes of a (peft-wrapped) model's base tensors, each storage once and adapter tensors left out:
    what Base.nbytes counted at load."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen: set[tuple[int, int]] = set()
    total = 0
    for name, t in hf.state_dict().items():
        key = (t.data_ptr(), t.numel())
        if ".lora_" in name or ".ia3_" in name or key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def fit_model(cfg: TrainConfig, model: Any, block_len: int, budget_mib: float, compute: str) -> TrainConfig:
    """fit_micro_batch for what train() holds: the peft model (base bytes and adapter counted on it), whose
    activations are `compute` (fp32: 4 bytes, bf16/fp16: 2)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act_bytes = 4 if compute == "fp32" else 2
    return _fit(
        cfg, Shape.of(hf.config), base_bytes_of(model), adapter_params, block_len, budget_mib, act_bytes
    )


def full_base_mib(base: Any, full_quant: str, adapter_params: int, tokens: int, cfg: TrainConfig) -> float:
    """Estimated peak (MiB) of a process that holds `base` (a fedpeft.model.base.Base, as loaded) and also loads
    its unquantized copy (`full_quant`: bf16 or none) to evaluate `tokens` tokens a batch on it: what
    --full-base costs a device at round 0 and in the last round, on top of its own base."""
    wide = full_quant == "none" or base.compute == "fp32"  # it computes as the device's own base does
    full_bytes = parameter_count(base.path) * (4 if wide else 2)
    act_bytes = 4 if wide else 2
    shape = Shape.of(base.model.config)
    return peak_mib(
        shape,
        base.nbytes + full_bytes,
        adapter_params,
        tokens,
        cfg.checkpointing,
        cfg.loss_chunk,
        False,
        act_bytes,
    )


def fp32_fits(model: Any, extra_bytes: int, budget_mib: float, tokens: int = 128) -> bool:
    """Whether a base computed in fp32 (its bf16-stored tensors widened: `extra_bytes` more) still trains one
    block of `tokens` within `budget_mib` (the smallest micro-batch, compact heap, fp32 activations)."""
    try:
        shape = Shape.of(model.config)
    except FedpeftError:
        return True  # no estimate for this architecture: --max-memory is checked when training starts
    need = peak_mib(shape, base_bytes_of(model) + extra_bytes, 0, tokens, True, 128, True, act_bytes=4)
    return need <= budget_mib
