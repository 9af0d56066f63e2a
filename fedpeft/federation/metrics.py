"""A round's metrics as types: what metrics.jsonl holds, one `RoundMetrics` a line.

The round loop still builds plain dicts (fedpeft.federation.rounds, evaluation, forgetting, privacy.plan);
the readers (the round line, plot.png, the summary, the trackers) convert them here. `from_json` keeps every
key it does not type in `extra`, and which typed keys were written as null (round 0's `train_loss`) in
`nulls`, so `to_json(from_json(d)) == d` for every line written today or by an older version: old runs
still read, and metrics.jsonl rewritten from them stays byte-identical. Values are kept as read (an int
loss stays an int), for the same reason. No fedpeft imports: every part of the server may read metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Self

_OWN = ("extra", "nulls")  # a record's own bookkeeping, never a metrics key


@dataclass(kw_only=True, slots=True)
class _Record:
    """Typed keys as fields (None: absent), the rest as read."""

    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not type
    nulls: frozenset[str] = frozenset()  # typed keys that were written as null, not left out

    # key -> the record type its value is read as; (type,) for a mapping of them keyed by user
    NESTED: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def typed(cls) -> tuple[str, ...]:
        """The keys this record types, in field order (computed once per class: a federation of
        10,000 clients reads as many entries a round, and every round re-reads the history)."""
        if cls not in _TYPED:
            _TYPED[cls] = tuple(f.name for f in fields(cls) if f.name not in _OWN)
            _KEYS[cls] = frozenset(_TYPED[cls])
        return _TYPED[cls]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Self:
        cls.typed()
        typed, values, extra, nulls = _KEYS[cls], {}, {}, set()
        for key, value in d.items():
            if key not in typed:
                extra[key] = value
            elif value is None:
                nulls.add(key)
            elif (read := _read(cls.NESTED.get(key), value)) is _UNREAD:
                extra[key] = value  # not the shape this version knows: kept as it was
            else:
                values[key] = read
        return cls(**values, extra=extra, nulls=frozenset(nulls))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.typed():
            value = getattr(self, key)
            if value is not None:
                out[key] = _write(value)
            elif key in self.nulls:
                out[key] = None
        return {**out, **self.extra}

    def __bool__(self) -> bool:
        """False for a record that holds nothing, as its dict was: `if m.dp:` reads as `if m.get("dp"):`."""
        return bool(self.extra or self.nulls) or any(getattr(self, k) is not None for k in self.typed())


_UNREAD = object()
_TYPED: dict[type, tuple[str, ...]] = {}
_KEYS: dict[type, frozenset[str]] = {}


def _read(kind: Any, value: Any) -> Any:
    if kind is None:
        return value
    if not isinstance(value, Mapping):
        return _UNREAD
    if isinstance(kind, tuple):  # per-client entries
        if not all(isinstance(v, Mapping) for v in value.values()):
            return _UNREAD
        return {user: kind[0].from_json(v) for user, v in value.items()}
    return kind.from_json(value)


def _write(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_json()
    if isinstance(value, dict) and value and all(isinstance(v, _Record) for v in value.values()):
        return {k: v.to_json() for k, v in value.items()}
    return value


@dataclass(kw_only=True, slots=True)
class ClientEval(_Record):
    """One client's evaluation in a round (fedpeft.federation.evaluation.eval_metrics, personal_entry)."""

    loss: float | None = None  # the global adapter's held-out loss
    ppl: float | None = None
    tokens: int | None = None
    base_loss: float | None = None  # a sampled evaluation: the base alone on the same text
    full_base_loss: float | None = None
    full_ppl: float | None = None  # the adapter on the unquantized base
    task: dict[str, Any] | None = None  # the client's task counts (fedpeft.federation.task_eval.client_entry)
    base_ppl: float | None = None  # with personalization: round 0's figure for this user
    kept: str | None = None  # "global" or "personal": the adapter the device keeps
    note: str | None = None
    personal_seconds: float | None = None
    personal_ppl: float | None = None
    personal_task: dict[str, Any] | None = None
    kept_ppl: float | None = None
    val_loss_global: float | None = None
    val_loss_personal: float | None = None
    personal_reference_ppl: float | None = None
    forgets: bool | None = None
    own_gain: float | None = None  # specificity (fedpeft.federation.personal_summary.specificity)
    others_gain: float | None = None
    others: int | None = None
    specificity: float | None = None


@dataclass(kw_only=True, slots=True)
class DpMetrics(_Record):
    """The round's differential privacy (fedpeft.privacy.plan.DpPlan.metrics): the guarantee so far."""

    mode: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    round_noise_multiplier: float | None = None  # distributed: None when the sum was not unmasked
    clip: float | None = None
    sampling: str | None = None
    q: float | None = None
    counted: int | None = None
    clipped_fraction: float | None = None
    budget: float | None = None
    dropout_margin: float | None = None
    counted_min: int | None = None
    local_noise_multiplier: float | None = None
    tau_d: float | None = None


@dataclass(kw_only=True, slots=True)
class TaskMetrics(_Record):
    """The round's pooled task figures (fedpeft.federation.task_eval.pooled, add_task_changes)."""

    kind: str | None = None  # classify | generate
    n: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    exact_match: float | None = None
    rouge_l: float | None = None
    base: float | None = None  # round 0's base, zero-shot, on the same clients
    vs_base: float | None = None


@dataclass(kw_only=True, slots=True)
class RoundMetrics(_Record):
    """One line of metrics.jsonl: a round (0: the base before training) and what it cost."""

    NESTED: ClassVar[Mapping[str, Any]] = {
        "eval_per_client": (ClientEval,),
        "dp": DpMetrics,
        "task": TaskMetrics,
    }

    round: int
    # training (fedpeft.federation.rounds)
    train_loss: float | None = None  # null in round 0 and in a skipped round
    train_seconds_max: float | None = None
    train_seconds_sum: float | None = None
    client_seconds: dict[str, dict[str, float]] | None = None  # by user: stage seconds, device figures
    skipped: bool | None = None
    kept_previous: str | None = None  # why the forgetting guard kept the previous adapter
    abort: str | None = None  # why a secure round was aborted
    seconds: float | None = None
    # clients
    sampled: list[str] | None = None
    accepted: list[str] | None = None
    rejected: list[dict[str, str]] | None = None  # {client, reason}
    left_before_unmask: list[str] | None = None
    secagg: bool | None = None
    secagg_k: int | None = None
    secagg_t: int | None = None
    secagg_stages: int | None = None
    bytes_up: int | None = None
    ranks: dict[str, int] | None = (
        None  # each client's LoRA rank, where some trained less than the federation's
    )
    effective_rank: float | None = None  # of the global adapter's updates B·A (fedpeft.federation.ranks)
    bytes_down: int | None = None
    bytes_down_eval: int | None = None
    # evaluation (fedpeft.federation.evaluation)
    eval_loss: float | None = None
    eval_ppl: float | None = None
    eval_tokens: int | None = None
    eval_ppl_client_mean: float | None = None
    eval_per_client: dict[str, ClientEval] | None = None
    eval_seconds: float | None = None
    eval_of: int | None = None  # a --fraction-evaluate sample of this many clients
    eval_failed: bool | None = None
    full_eval_loss: float | None = None
    full_eval_ppl: float | None = None
    full_eval_clients: int | None = None
    # the bases of round 0
    quant: str | None = None
    full_base: str | None = None
    device: str | None = None
    compute: dict[str, dict[str, Any]] | None = None  # round 0: each client's compute dtype and why
    quants: dict[str, str] | None = None  # round 0: each client's quantization, where they differ
    base_ppl: float | None = None
    base_clients: int | None = None
    vs_base: float | None = None
    full_base_ppl: float | None = None
    full_base_clients: int | None = None
    vs_full_base: float | None = None
    # the reference text (fedpeft.federation.forgetting)
    reference_ppl: float | None = None
    base_reference_ppl: float | None = None
    forgetting: float | None = None
    reference_clients: int | None = None
    dp: DpMetrics | None = None
    task: TaskMetrics | None = None
    personal: dict[str, Any] | None = (
        None  # fedpeft.federation.personal_summary.summarize: its keys vary by method
    )

    @property
    def clients(self) -> dict[str, ClientEval]:
        return self.eval_per_client or {}

    def scalars(self) -> dict[str, float]:
        """The round's figures for a tracker (TensorBoard, MLflow), by name: "eval/ppl", "train/loss"..."""
        out = {name: getattr(self, key) for name, key in SCALARS}
        out["clients/sampled"] = len(self.sampled) if self.sampled is not None else None
        out["clients/accepted"] = len(self.accepted) if self.accepted is not None else None
        out["clients/refused"] = len(self.rejected) if self.rejected is not None else None
        out["clients/evaluated"] = len(self.eval_per_client) if self.eval_per_client is not None else None
        for prefix, record in (("dp", self.dp), ("task", self.task)):
            if record is not None:
                out.update({f"{prefix}/{k}": v for k, v in record.to_json().items()})
        out.update({f"personal/{k}": v for k, v in (self.personal or {}).items()})
        return {k: float(v) for k, v in out.items() if _number(v)}


SCALARS = (  # (tracker name, RoundMetrics field)
    ("train/loss", "train_loss"),
    ("train/seconds_max", "train_seconds_max"),
    ("train/seconds_sum", "train_seconds_sum"),
    ("round/seconds", "seconds"),
    ("round/skipped", "skipped"),
    ("eval/loss", "eval_loss"),
    ("eval/ppl", "eval_ppl"),
    ("eval/ppl_client_mean", "eval_ppl_client_mean"),
    ("eval/tokens", "eval_tokens"),
    ("eval/seconds", "eval_seconds"),
    ("eval/full_base_loss", "full_eval_loss"),
    ("eval/full_base_ppl", "full_eval_ppl"),
    ("base/ppl", "base_ppl"),
    ("base/vs_base", "vs_base"),
    ("base/full_ppl", "full_base_ppl"),
    ("base/vs_full_base", "vs_full_base"),
    ("reference/ppl", "reference_ppl"),
    ("reference/base_ppl", "base_reference_ppl"),
    ("reference/forgetting_percent", "forgetting"),
    ("bytes/up", "bytes_up"),
    ("adapter/effective_rank", "effective_rank"),
    ("bytes/down", "bytes_down"),
    ("bytes/down_eval", "bytes_down_eval"),
)


def _number(v: Any) -> bool:
    """A figure a tracker can plot: a number or a flag, finite; not a name or a list."""
    return isinstance(v, int | float) and math.isfinite(v)


def as_metrics(m: RoundMetrics | Mapping[str, Any]) -> RoundMetrics:
    """A round's metrics, typed: the readers take either while the loop still builds dicts."""
    return m if isinstance(m, RoundMetrics) else RoundMetrics.from_json(m)


def as_history(history: Sequence[RoundMetrics | Mapping[str, Any]]) -> list[RoundMetrics]:
    return [as_metrics(h) for h in history]


def base_name(quant: str) -> str:
    """How figures name a base: NF4, int8, bf16, fp32; devices of several quantizations (bf16+nf4): bf16 + NF4."""
    return " + ".join({"nf4": "NF4", "none": "fp32"}.get(q, q) for q in quant.split("+"))
