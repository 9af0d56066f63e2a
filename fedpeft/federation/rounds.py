"""A training round's outcome and metrics without Flower, the same for plain and secure rounds.

fedpeft.federation.loop moves the messages and hands the replies here: `plain_round` checks and aggregates a plain
round's updates (fedpeft.federation.secure_round does a secure round's sum); `train_result` reads one client's
figures and `train_metrics` makes the round's of them; `secure_metrics`, `aborted_metrics` and
`secagg_rejections` read secure_sum's report. fedpeft.federation.evaluation has the evaluation side.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedpeft.config.tree import RunConfig
from fedpeft.federation.aggregate import Arrays, weighted_sum
from fedpeft.federation.evaluation import changes_text
from fedpeft.federation.metrics import RoundMetrics, as_history, as_metrics, base_name
from fedpeft.federation.personal_summary import summary_line
from fedpeft.federation.ranks import travel_rank, truncate
from fedpeft.federation.state import ServerState, aggregate_round, apply_mean, check_update, skip_round
from fedpeft.federation.task_eval import task_text
from fedpeft.log import show_bars
from fedpeft.personal.strategies import method_label, strategy_for
from fedpeft.privacy.central import clip, noised_mean

if TYPE_CHECKING:
    from fedpeft.federation.sinks import Sink
    from fedpeft.privacy.plan import DpPlan

log = logging.getLogger("fedpeft")

# where a client's time goes, reported as <stage>_seconds; wait: its messages waiting to start (transport,
# the SuperNode's poll, the worker's claim); mask: encoding and masking (secure stage 3)
PLAIN_STAGES = ("load", "train", "personal", "wait")
SECURE_STAGES = ("load", "train", "mask", "personal", "wait")
# what a device says of itself, kept next to its seconds when it reports them: base loads since it started
# (1 when the worker keeps its base resident), its processes' memory (summed peak RSS; the sampled peak PSS
# of the tree and its cgroup's peak: fedpeft.device.tasks.device_stats), its peak GPU memory on CUDA,
# under DP whether clipping scaled its delta (1) or not (0), and how many clients a simulated actor trained
# in lockstep with it (fedpeft.training.lockstep)
DEVICE_FIGURES = (
    "lockstep_clients",
    "base_loads",
    "peak_rss_mib",
    "peak_pss_mib",
    "cgroup_peak_mib",
    "gpu_peak_mib",
    "dp_clipped",
)


@dataclass(frozen=True)
class TrainResult:
    """One client's training figures in a round."""

    user: str
    examples: float  # training tokens: the weight of its loss
    loss: float  # mean training loss over its local steps
    seconds: dict[str, float]  # by stage (PLAIN_STAGES or SECURE_STAGES), and the DEVICE_FIGURES it sent


def train_result(
    user: str, m: Mapping[str, Any], stages: Sequence[str], lenient: bool = False
) -> TrainResult:
    """A client's figures from its metrics record. A plain round's reply must carry its example count, loss
    and training time (KeyError otherwise). Under secure aggregation (`lenient`) they are metrics only,
    the weights travel masked: a missing figure counts 0 and the count at least 1e-12, so a client's
    malformed report cannot stop the round. Other stages' times count 0 when missing."""
    if lenient:
        examples = max(float(m.get("num-examples", 1.0)), 1e-12)
        loss = float(m.get("train_loss", 0.0))
    else:
        examples, loss = float(m["num-examples"]), float(m["train_loss"])
    seconds = {
        s: float(m[f"{s}_seconds"] if s == "train" and not lenient else m.get(f"{s}_seconds", 0.0))
        for s in stages
    }
    for k in DEVICE_FIGURES:
        if k in m:
            seconds[k] = float(m[k])
    return TrainResult(user, examples, loss, seconds)


def train_metrics(results: Sequence[TrainResult]) -> dict[str, Any]:
    """The round's training figures from its accepted clients (at least one), in client order."""
    weights = [r.examples for r in results]
    return {
        "train_loss": sum(r.loss * w for r, w in zip(results, weights, strict=True)) / sum(weights),
        "train_seconds_max": max(r.seconds["train"] for r in results),
        "train_seconds_sum": sum(r.seconds["train"] for r in results),
        "client_seconds": {r.user: dict(r.seconds) for r in results},
    }


def skipped_metrics(**extra: Any) -> dict[str, Any]:
    """A round that left the global adapter unchanged."""
    return {"skipped": True, "train_loss": None, **extra}


@dataclass(frozen=True)
class Update:
    """One client's reply to a plain training round."""

    delta: Arrays  # travel keys only
    fingerprint: str  # of the base it trained on
    metrics: Mapping[str, Any]  # its metrics record: num-examples, train_loss, <stage>_seconds
    source: str = ""  # of the weights that base was quantized from (fedpeft.model.fingerprint)


def plain_round(
    state: ServerState,
    cfg: RunConfig,
    names: Mapping[int, str],
    sampled: Sequence[int],
    replies: Mapping[int, Update | str],
    dp: DpPlan | None = None,
) -> tuple[ServerState, dict[str, Any]]:
    """A plain round from the sampled clients' replies (an update, or the error text of a client that
    failed): check each update against the state (fedpeft.federation.state.check_update), aggregate the valid
    ones in client order (the result does not depend on reply arrival order), or leave the adapter
    unchanged when fewer than min_clients are valid. Returns the next state and the round's metrics."""
    rnd, min_clients = state.round + 1, cfg.federation.min_clients
    deltas, results, rejected, bytes_up, ranks = [], [], [], 0, []
    full = travel_rank(state.info.schema, state.travel_keys)
    for client, reply in sorted(replies.items()):
        if isinstance(reply, str):
            rejected.append({"client": names.get(client, str(client)), "reason": f"client error: {reply}"})
            continue
        bytes_up += sum(a.nbytes for a in reply.delta.values())
        reason = check_update(
            reply.delta, reply.fingerprint, float(reply.metrics["num-examples"]), state, reply.source
        )
        rank = reply.metrics.get("rank", full) if full else 0
        if (
            not reason
            and full
            and not (isinstance(rank, int | float) and 1 <= rank <= full and rank == int(rank))
        ):
            reason = f"rank {rank} is not 1 to the federation's {full}"
        if reason:
            rejected.append({"client": names[client], "reason": reason})
        else:
            # what lies outside the slice it trains is not its to change (fedpeft.federation.ranks)
            deltas.append(truncate(reply.delta, int(rank)) if full else reply.delta)
            ranks.append(int(rank))
            results.append(train_result(names[client], reply.metrics, PLAIN_STAGES))
    for r in rejected:
        log.warning("round %d: refused %s: %s", rnd, r["client"], r["reason"])
    metrics: dict[str, Any] = {
        "round": rnd,
        "sampled": [names[c] for c in sampled],
        "accepted": [r.user for r in results],
        "rejected": rejected,
        "bytes_up": bytes_up,
        "bytes_down": sum(a.nbytes for a in state.travel_arrays().values()) * len(sampled),
    }
    if len(results) < min_clients:
        log.warning(
            "round %d: %d valid replies < min_clients %d; global adapter unchanged",
            rnd,
            len(results),
            min_clients,
        )
        return skip_round(state), {**metrics, **skipped_metrics()}
    if dp is not None:  # DP-FedAvg: the server clips again (its guarantee), sums, adds noise
        total = weighted_sum([clip(d, dp.clip)[0] for d in deltas], [1.0] * len(deltas))
        new = apply_mean(state, noised_mean(total, dp.expected_clients, dp.noise_std), cfg)
    else:
        new = aggregate_round(state, deltas, [r.examples for r in results], cfg, ranks if full else None)
    return new, {**metrics, "skipped": False, **train_metrics(results), **rank_metrics(results, ranks, full)}


def rank_metrics(results: Sequence[TrainResult], ranks: Sequence[int], full: int) -> dict[str, Any]:
    """Each client's LoRA rank, where some trained less than the federation's."""
    if not full or all(r == full for r in ranks):
        return {}
    return {"ranks": {res.user: r for res, r in zip(results, ranks, strict=True)}}


def secure_metrics(
    report: Mapping[str, Any], survivors: Sequence[int], names: Mapping[int, str], dim: int, full: int = 0
) -> dict[str, Any]:
    """A secure round's metrics from secure_sum's report (fedpeft.secagg.server_stages), the survivors' training
    figures included (they travel beside the masked input)."""
    train = report["train_metrics"]
    results = [train_result(names[c], train[c], SECURE_STAGES, lenient=True) for c in survivors]
    return {
        "rejected": secagg_rejections(report, survivors, names),
        "left_before_unmask": [names[c] for c in survivors if c in report["dropped"]],
        "skipped": False,
        "accepted": [names[c] for c in survivors],
        "secagg_k": report["k"],
        "secagg_t": report["t"],
        "secagg_stages": report.get("stages", 5),
        "bytes_up": 4 * dim * len(survivors) + report["bytes_up_keys"],
        **train_metrics(results),
        **rank_metrics(results, [int(train[c].get("rank", 0)) for c in survivors], full),
    }


def aborted_metrics(
    report: Mapping[str, Any], names: Mapping[int, str], rnd: int, error: str
) -> dict[str, Any]:
    """An aborted secure round: who dropped or refused, and why (a device's refusal says which of its
    limits the round broke); the global adapter stays unchanged."""
    log.warning("round %d: secure aggregation aborted (%s); global adapter unchanged", rnd, error)
    rejected = secagg_rejections(report, [], names)
    for r in rejected:
        log.warning("round %d: %s: %s", rnd, r["client"], r["reason"])
    return {"rejected": rejected, **skipped_metrics(accepted=[], bytes_up=0, abort=error)}


def secagg_rejections(
    report: Mapping[str, Any], survivors: Sequence[int], names: Mapping[int, str]
) -> list[dict[str, str]]:
    """Metrics entries for the clients whose input is not in the sum: dropped (with their own error reply,
    a refusal included) or excluded. A client gone after stage 3 already sent its input: it still counts."""
    out = []
    for c, reason in {**report.get("dropped", {}), **report.get("excluded", {})}.items():
        if c not in survivors:
            out.append(
                {"client": names[c], "reason": f"dropped at {reason}" if "stage" in reason else reason}
            )
    return out


def aggregation_note(cfg: RunConfig) -> str:
    """How LoRA's two matrices (VeRA's two vectors, DoRA's matrices and magnitude) are aggregated under this
    configuration."""
    if cfg.adapter.kind == "vera":
        return "FedAvg of VeRA's vectors b and d separately (mean of b·d is not mean(b)·mean(d): an approximation)"
    if cfg.adapter.kind == "dora":
        return (
            "FedAvg of DoRA's A, B and magnitude separately (the update is a product and a normalization of "
            "them: an approximation)"
        )
    if cfg.federation.lora_mode == "ffa":
        return "FFA-LoRA (A frozen and shared, B averaged: exact)"
    if cfg.federation.lora_mode == "sb":
        return "Fed-SB (A and B frozen at the base's singular vectors, the r x r matrix averaged: exact)"
    note = strategy_for(cfg).aggregation_note()  # FedSA-LoRA's: A averaged, B personal
    if note is not None:
        return note
    return "FedAvg of LoRA A and B separately (mean of B·A is not mean(B)·mean(A): an approximation)"


def compute_metrics(names: Mapping[int, str], compute: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Round 0's `compute`: each client's compute dtype, why, and the speeds it chose from, by user name."""
    return {"compute": {names[c]: dict(compute[c]) for c in sorted(compute)}} if compute else {}


def compute_text(per_client: Mapping[str, Mapping[str, Any]]) -> str:
    """`computing in fp32 (auto: AVX2 CPU: bf16 matmul 0.024x fp32's speed)`, one phrase per distinct
    choice, with how many clients made it when they differ."""
    groups: dict[tuple[str, str], int] = {}
    for c in per_client.values():
        key = (str(c.get("dtype", "?")), str(c.get("why", "")))
        groups[key] = groups.get(key, 0) + 1
    if len(groups) == 1:
        ((dtype, why),) = groups
        return f"computing in {dtype} ({why})" if why else f"computing in {dtype}"
    return "computing in " + "; ".join(
        f"{dtype} on {n} ({why})" for (dtype, why), n in sorted(groups.items())
    )


def round_line(m: RoundMetrics | Mapping[str, Any]) -> str:
    """A round's metrics as the line a run prints (`simulate` under its bar, `server` from metrics.jsonl)."""
    m = as_metrics(m)
    if m.eval_ppl is None:
        why = "every client's evaluation failed" if m.eval_failed else "--eval-every"
        text = f"round {m.round}: not evaluated ({why})"
    else:
        task = task_text({"task": m.task.to_json()}) if m.task is not None else ""
        text = f"round {m.round}: " + (f"{task}; answer " if task else "held-out ")
        text += f"ppl {m.eval_ppl:.2f} (loss {m.eval_loss:.3f}"
        if m.eval_of:
            text += f" over {len(m.clients)} of {m.eval_of} clients"
        changes = changes_text(m)
        text += f"; {changes})" if changes else ")"
    if m.round == 0 and m.quant is not None:
        text += f" on the {base_name(m.quant)} base"
        if m.compute:
            text += f", {compute_text(m.compute)}"
        if m.full_eval_ppl is not None:
            cost = m.eval_ppl / m.full_eval_ppl - 1
            text += f"; {m.full_eval_ppl:.2f} on the {m.full_base} base (quantizing costs {cost:+.1%})"
    elif m.full_eval_ppl is not None:
        text += f"; {m.full_eval_ppl:.2f} with the adapter on the {m.full_base} base"
    # what the adapter costs the base's general ability (fedpeft.federation.forgetting)
    if m.reference_ppl is not None:
        text += f"; reference ppl {m.reference_ppl:.2f}"
        text += f" ({m.forgetting:+.1f}% vs the base)" if m.round > 0 else ""
    if m.round > 0:
        seconds = m.seconds if m.seconds is not None else 0.0
        text += f", {len(m.accepted or [])}/{len(m.sampled or [])} clients, {seconds:.1f} s"
        text += " [skipped]" if m.skipped else ""
        text += " [kept the previous adapter: it forgets]" if m.kept_previous else ""
        if m.dp:
            text += f", ε = {m.dp.epsilon:.2f}"
        if m.ranks and m.effective_rank is not None:  # mixed ranks: the rank-collapse check
            text += f", effective rank {m.effective_rank:.2f}"
    return text


class ConsoleSink:
    """The console's sink (fedpeft.federation.sinks.Sink): the rounds bar, each round's line under it and
    the personalization summary where a round has one. It lives here, beside round_line."""

    def __init__(self, bar: Any, method: str) -> None:
        self.bar, self.method = bar, method

    def round(self, m: RoundMetrics) -> None:
        self.bar.update(1)
        if m.eval_ppl is not None:
            self.bar.set_postfix(ppl=f"{m.eval_ppl:.2f}", loss=f"{m.eval_loss:.3f}")
        self.bar.write(round_line(m))
        if m.personal is not None:
            self.bar.write(f"round {m.round}: " + summary_line(m.personal, self.method))

    def close(self) -> None:
        self.bar.close()


class Progress:
    """The rounds bar (with --no-progress none) and the lines printed after each round: the sinks the loop
    hands each round to here. The files and trackers are save_round's (fedpeft.federation.sinks), which
    knows the run folder; the loop still builds dicts, typed here."""

    def __init__(self, cfg: RunConfig, state: ServerState) -> None:
        # tqdm.auto (it imports asyncio): off `fedpeft server`'s start-up path, which imports round_line
        from tqdm.auto import tqdm

        rounds = cfg.federation.rounds
        bar = tqdm(
            total=rounds,
            initial=min(state.round, rounds),
            desc="rounds",
            disable=not show_bars(cfg.train.progress),
            unit="round",
        )
        history = as_history(state.history)
        evaluated = [h for h in history if h.eval_ppl is not None]  # round 0 always is
        bar.set_postfix(ppl=f"{evaluated[-1].eval_ppl:.2f}" if evaluated else "")
        if state.round == 0:  # what the base scores, on which base(s), before any training
            bar.write(round_line(history[0]))
        self.sinks: list[Sink] = [ConsoleSink(bar, method_label(cfg.personal))]

    def round(self, m: RoundMetrics | Mapping[str, Any]) -> None:
        metrics = as_metrics(m)
        for sink in self.sinks:
            sink.round(metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
