"""The checks every entry runs on a RunConfig (CLI flags, config files, Flower's run config, a saved
config.json, a device reading the server's config), beyond each field's own range and choices."""

from __future__ import annotations

import math
import re

from fedpeft.config.federated import TRACKERS, FederationConfig, PrivacyConfig
from fedpeft.config.fields import check_value
from fedpeft.config.run_config import RunConfig, fields
from fedpeft.config.secagg_bounds import MIN_NEIGHBOURS, degree, min_threshold
from fedpeft.errors import FedpeftError


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
    _check(f.lora_mode == "fedavg" or a.kind == "lora", f"--lora-mode {f.lora_mode} applies to LoRA only")
    _check(not a.lora_sb, "adapter.lora_sb follows from --lora-mode sb; it is not set by hand")
    _check(f.lora_mode != "sb" or not a.freeze_a, "--lora-mode sb freezes A and B already: drop --freeze-a")
    # a personal adapter is kept as a plain LoRA folder; Fed-SB's matrix is not read back from one yet
    _check(
        f.lora_mode != "sb" or p.method == "none",
        "--lora-mode sb has no personal adapters yet: use --personalize none",
    )
    if f.client_ranks:
        _validate_ranks(cfg)
    if f.client_quants:
        _validate_quants(cfg)
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
    unknown = [name for name in f.log_to if name not in TRACKERS]
    _check(not unknown, f"--log-to names trackers from {', '.join(TRACKERS)}; got {', '.join(unknown)}")
    _validate_privacy(cfg.privacy, f.secagg)
    return cfg


QUANTS = ("none", "bf16", "int8", "nf4")  # --quant's choices but auto, which each device resolves


def _validate_ranks(cfg: RunConfig) -> None:
    """Mixed LoRA ranks (fedpeft.federation.ranks): plain LoRA or FFA-LoRA, each rank within the federation's."""
    a, f = cfg.adapter, cfg.federation
    _check(
        a.kind == "lora" and f.lora_mode in ("fedavg", "ffa"),
        "mixed ranks need --adapter lora, --lora-mode fedavg or ffa",
    )
    bad = [r for r in f.client_ranks if not 1 <= r <= a.rank]
    _check(
        not bad,
        f"a client's rank must be 1 to the federation's --lora-r {a.rank}, got {bad[0] if bad else 0}",
    )
    # DP clips and noises the whole padded delta and weighs every client 1: per-slice means are not planned
    _check(cfg.privacy.mode == "off", "mixed ranks are not combined with --dp yet")
    _check(cfg.personal.method == "none", "mixed ranks have no personal adapters yet: use --personalize none")


def _validate_quants(cfg: RunConfig) -> None:
    """Devices of several quantizations of one base (fedpeft.model.fingerprint)."""
    f = cfg.federation
    bad = [q for q in f.client_quants if q not in QUANTS]
    _check(not bad, f"--client-quants takes {', '.join(QUANTS)}; got {bad[0] if bad else ''}")
    # Fed-SB's frozen A and B are the singular vectors of the weights each device holds: they differ by quantization
    _check(
        f.lora_mode != "sb", "--lora-mode sb derives its basis from each device's base: drop --client-quants"
    )
    _check(
        f.clients_per_actor <= 1,
        "a lockstep group shares one base: --client-quants needs --clients-per-actor 0 or 1",
    )


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
    default minimum checks them (fedpeft.secagg.protocol, on fedpeft.config.secagg_bounds): every update masked with at least MIN_NEIGHBOURS
    others, and a threshold no server with one colluding client can split. k = 0 gave no neighbours, and
    the server read every update from its own unmask request."""
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
