"""A federation round under SecAgg+ on the server: the sampled clients' updates summed masked
(fedpeft.secagg.server_stages.secure_sum), decoded to their weighted mean, the server optimizer's step.
The server sees masked vectors and recovers only their sum. The round loop hands in `send`, which
delivers the stage messages; everything else is here. Flower reaches this module only through
fedpeft.secagg.server_stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedpeft.config.tree import RunConfig, client_lr
from fedpeft.federation import rounds
from fedpeft.federation.ranks import divide_by_slice, round_cap, thin_slice, travel_rank
from fedpeft.federation.state import ServerState, apply_mean, skip_round
from fedpeft.privacy.central import noised_mean
from fedpeft.privacy.discrete import tau
from fedpeft.privacy.distributed import DistributedCode
from fedpeft.privacy.plan import DpPlan, ran
from fedpeft.secagg.protocol import Keys, SecAggAbort
from fedpeft.secagg.quantize import RingCode
from fedpeft.secagg.records import unflatten
from fedpeft.secagg.server_stages import SecAggParams, SecureSumReport, Send, secure_sum, stage1_tasks


def ring_code(cfg: RunConfig, weights: Sequence[float], slots: int = 0, cap: int = 0) -> RingCode:
    """The round's encoding for these clients' weights (example counts): clip at twice what AdamW can move
    a coordinate in the local steps (fedpeft/secagg/quantize.py); `slots` rank slices' weights beside."""
    clip = 2 * client_lr(cfg) * cfg.federation.local_steps
    return RingCode(
        clip=clip, max_clients=max(len(weights), 1), max_weight=max(weights), slots=slots, rank_cap=cap
    )


def _slices_check(report: SecureSumReport, cap: int, least: int) -> Callable[[list[int]], None]:
    """Before unmasking: the survivors (their ranks travel in the clear, beside the masked input) must not
    leave a rank slice to fewer than `least` of them, or the sum would hold one client's slice as it is."""

    def check(survivors: list[int]) -> None:
        train = report.train_metrics
        ranks = [int(train.get(c, {}).get("rank", cap)) for c in survivors]
        if (j := thin_slice(ranks, cap, least)) is not None:
            raise SecAggAbort(f"not unmasked: rank slice {j + 1} was trained by fewer than {least} survivors")

    return check


def _distributed(
    dp: DpPlan, state: ServerState, sampled: int, dim: int, noised: dict[str, Any]
) -> tuple[DistributedCode, Callable[[list[int]], None]]:
    """The round's distributed-DP encoding, and the check before unmasking: the survivors' noise must keep
    the budget (a round with fewer survivors than the margin allows for spends more). `noised` receives
    what the unmasked sum holds, for the accountant (fedpeft.privacy.plan)."""
    try:
        code = DistributedCode.for_round(dp.clip, dp.noise_multiplier, dp.counted_min, sampled, dim)
    except ValueError as e:
        raise SecAggAbort(str(e)) from None

    def check(survivors: list[int]) -> None:
        z, tau_d = code.noise_multiplier(len(survivors)), tau(code.local_noise, len(survivors)) * dim
        if not dp.allows_spent([*ran(state.history), (z, tau_d)]):
            raise SecAggAbort(
                f"not unmasked: the noise of {len(survivors)} survivors (multiplier {z:.3g}) would spend more "
                f"than --dp-epsilon {dp.budget:g}"
            )
        noised.update(
            counted=len(survivors), noise_multiplier=z, tau_d=tau_d, local_multiplier=code.local_multiplier
        )

    return code, check


def round_tag(fingerprint: str, seed: int, rnd: int) -> bytes:
    """Binds a round's keys and signatures to the federation's base, seed and round."""
    return f"{fingerprint[:16]}|seed-{seed}|round-{rnd}".encode()


def _params(cfg: RunConfig) -> SecAggParams:
    return SecAggParams(cfg.federation.secagg_k, cfg.federation.secagg_threshold or None)


def advertise_ahead(
    cfg: RunConfig, fingerprint: str, rnd: int, sampled: list[int]
) -> dict[int, dict[str, Any]]:
    """Round `rnd`'s stage-1 tasks, sent with round rnd - 1's last message so the round starts at stage 2."""
    f = cfg.federation
    if len(sampled) < max(2, f.min_clients):
        return {}
    return stage1_tasks(sampled, _params(cfg), round_tag(fingerprint, f.seed, rnd), f.seed + rnd)


def secure_round(
    state: ServerState,
    cfg: RunConfig,
    names: Mapping[int, str],
    examples: Mapping[int, float],
    sampled: list[int],
    send: Send,
    advertised: Mapping[int, tuple[dict[str, Any], Keys]] | None = None,
    dp: DpPlan | None = None,
    ranks: Mapping[int, int] | None = None,
) -> tuple[ServerState, dict[str, Any]]:
    """One round with the `sampled` clients (`examples`: their registered training tokens, which bound the
    encoded weights). `send` as secure_sum takes it; the stage-3 message must carry the global adapter.
    An aborted round leaves the adapter unchanged and names who dropped or refused, and why. A client on
    another base refuses at stage 1 and drops out there. `advertised`: keys sent ahead (advertise_ahead)."""
    rnd, f = state.round + 1, cfg.federation
    arrays = state.travel_arrays()
    # LoRA: each rank slice's weight travels in the sum too (fedpeft.federation.ranks); not under DP, which
    # weighs every client the same and does not combine with mixed ranks
    slots = 0 if dp is not None else travel_rank(state.info.schema, state.travel_keys)
    least = max(2, f.min_clients)  # a rank slice is never one client's
    rank_of = [(ranks or {}).get(c, 0) for c in sampled]
    cap = round_cap(rank_of, slots, least) if slots else 0
    code = ring_code(cfg, [examples[c] for c in sampled], slots, cap)
    dim = sum(a.size for a in arrays.values()) + slots + 1
    metrics: dict[str, Any] = {
        "round": rnd,
        "sampled": [names[c] for c in sampled],
        "bytes_down": sum(a.nbytes for a in arrays.values()) * len(sampled),
        "secagg": True,
    }
    report = SecureSumReport()  # filled by secure_sum, read also when it aborts
    noised: dict[str, Any] = {}  # distributed DP: what the unmasked sum held (its noise counts from then on)
    try:
        if len(sampled) < f.min_clients:
            raise SecAggAbort(
                f"{len(sampled)} clients on the federation's base < min_clients {f.min_clients}"
            )
        tag = round_tag(state.info.fingerprint, f.seed, rnd)
        check = _slices_check(report, cap, least) if slots else None
        if dp is not None and dp.discrete:
            code, check = _distributed(dp, state, len(sampled), dim, noised)
        total, survivors, report = secure_sum(
            send, sampled, dim, code, _params(cfg), tag, f.seed + rnd, report, advertised, check
        )
        if isinstance(code, DistributedCode):
            sums, noised["clipped"] = code.decode_sum(total)
        if len(survivors) < f.min_clients:
            raise SecAggAbort(f"{len(survivors)} survivors < min_clients {f.min_clients}")
    except SecAggAbort as e:
        aborted = {**metrics, **rounds.aborted_metrics(report.as_dict(), names, rnd, str(e))}
        return skip_round(state), {**aborted, **({"dp_sum": noised} if "clipped" in noised else {})}
    if isinstance(code, DistributedCode):  # the noised sum of clipped deltas, over the expected count
        mean = unflatten(sums / dp.expected_clients, state.info.schema, state.travel_keys)
        metrics["dp_sum"] = noised
    else:
        weighted, weight = code.decode_sum(total)
        if slots:
            # each slice's weight, at most the total: a client's slots are its own to get wrong, not to inflate
            cover = np.clip(weighted[-slots:] / code.clip, 0.0, weight)
            cover[cover < 0.5 * min(examples[c] for c in sampled) / code.max_weight] = (
                0.0  # below any one client
            )
            mean = divide_by_slice(
                unflatten(weighted[:-slots], state.info.schema, state.travel_keys), cover, weight
            )
        else:
            mean = unflatten(weighted / weight, state.info.schema, state.travel_keys)
    if dp is not None and not dp.discrete:
        # central DP: every client weighed 1 and clipped, so mean x survivors is their sum
        total_sum = {k: a * len(survivors) for k, a in mean.items()}
        mean = noised_mean(total_sum, dp.expected_clients, dp.noise_std)
    new = apply_mean(state, mean, cfg)
    return new, {**metrics, **rounds.secure_metrics(report.as_dict(), survivors, names, dim, slots)}
