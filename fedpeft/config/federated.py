"""The sections of the config tree that only a federation has: its rounds and clients, the server's
optimizer, personal adapters and differential privacy (fedpeft.config.tree gathers them into RunConfig).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from fedpeft.config.fields import option

LoraMode = Literal["fedavg", "ffa", "sb"]
Split = Literal["natural", "iid", "dirichlet"]
ServerOpt = Literal["fedavg", "fedavgm", "fedadam", "fedyogi"]
Personalize = Literal["none", "finetune", "fedsa", "ditto"]
PersonalChange = Literal["specific", "all"]
DpMode = Literal["off", "central", "distributed"]

SPLITS: tuple[str, ...] = typing.get_args(Split)
SERVER_OPTS: tuple[str, ...] = typing.get_args(ServerOpt)
PERSONALIZE: tuple[str, ...] = typing.get_args(Personalize)
DP_MODES: tuple[str, ...] = typing.get_args(DpMode)
# the trackers --log-to writes to besides metrics.jsonl and plot.png (the `tracking` extra)
TRACKERS: tuple[str, ...] = ("tensorboard", "mlflow")


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
        "trained and sent (exact); sb: Fed-SB, A and B frozen at the base weights' top singular vectors, only "
        "an r x r matrix between them trained and sent (exact, r^2 numbers a layer)",
        flag="--lora-mode",
    )
    # HetLoRA (Cho et al., EMNLP 2024): a device of a smaller rank trains the leading slice of the shared
    # shape; the server averages each rank slice over the devices that train it (fedpeft.federation.ranks)
    client_ranks: tuple[int, ...] = option(
        (),
        "simulation: the LoRA rank each client trains, by turns (client i: the (i mod n)-th), each at most "
        "--lora-r, the federation's (default: all at --lora-r; a device sets its own with `fedpeft client "
        "--rank`)",
        flag="--client-ranks",
        metavar="R1,R2",
        commands=("simulate",),
    )
    # devices of one base in different precisions (fedpeft.model.fingerprint): keyed by the source weights
    client_quants: tuple[str, ...] = option(
        (),
        "simulation: how each client quantizes the base, by turns (client i: the (i mod n)-th), from none, "
        "bf16, int8 and nf4 (default: all --quant; a device sets its own with `fedpeft client --quant`)",
        flag="--client-quants",
        metavar="Q1,Q2",
        commands=("simulate",),
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
    # Trackers users already run, as optional extras: local files only, no account or network needed.
    log_to: tuple[str, ...] = option(
        (),
        "also log each round's metrics to these trackers, written into the run folder: TensorBoard event "
        "files (tb/) and an MLflow local file store (mlruns/); needs the `tracking` extra (default: none; "
        "metrics.jsonl and plot.png are always written)",
        flag="--log-to",
        metavar="tensorboard,mlflow",
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
    # fedpeft.simulation.lockstep: K training messages per actor at once, trained in lockstep through one base
    clients_per_actor: int = option(
        0,
        "simulated clients an actor trains at once, their batches stacked through one base forward and "
        "backward, each with its own adapter and optimizer (default 0: on GPUs the clients sampled a round "
        "shared among the actors, at most 8, fewer where memory is short; on CPUs 1, one after another)",
        flag="--clients-per-actor",
        metavar="K",
        ge=0,
        commands=("simulate",),
    )
    base_fingerprint: str = option(
        "",
        "the federation's base (sha256): the source weights (fedpeft.json's base.source; any quantization of "
        "them joins) or one exact quantized base (base.fingerprint; the others are refused); clients on "
        "another are refused (default: the source weights most clients hold)",
        flag="--base-fingerprint",
        metavar="SHA256",
        commands=("server",),
    )


@dataclass(frozen=True)
class PersonalConfig:
    """Personal adapters that never leave the device (fedpeft.personal.strategies)."""

    method: Personalize = option(
        "none",
        "finetune: a few local steps from the final global adapter; fedsa: LoRA A shared, B personal "
        "(FedSA-LoRA); ditto: a personal adapter pulled toward the global one (Ditto)",
        flag="--personalize",
    )
    # 10: with the specific change, finetune's own gain and its specificity both grow from 5 to 10 steps;
    # at 20 a user no longer beats the global adapter (benchmarks/README.md, "Specificity").
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
    # 0.8: just below the default model's measured delta norms after a round of 5 local steps
    # (benchmarks/README.md, "Differential privacy"). AdamW moves every coordinate about lr a step, so the
    # norms hardly vary: clipped a few percent, least noise for that.
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
