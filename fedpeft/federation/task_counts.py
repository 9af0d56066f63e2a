"""Classification counts that add up across clients (no torch: the server pools them)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_COUNT_KEY = re.compile(r"(tp|fp|fn)_(\d+)")


def _count(value: Any, key: str) -> int:
    """A count reported by a client: a finite, non-negative whole number (anything else is refused)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{key}: a count must be a finite non-negative whole number, got {value!r}")
    return int(value)


@dataclass
class ClassCounts:
    """Classification counts: examples, correct ones and per-label true/false positives and false negatives.
    Counts, not rates, so clients' counts add up to the counts of all their examples (`merge`), and the
    federation's accuracy and macro-F1 are those of the pooled predictions, not a mean of means."""

    n: int = 0
    correct: int = 0
    tp: list[int] = field(default_factory=list)
    fp: list[int] = field(default_factory=list)
    fn: list[int] = field(default_factory=list)

    @classmethod
    def zeros(cls, n_labels: int) -> ClassCounts:
        return cls(0, 0, [0] * n_labels, [0] * n_labels, [0] * n_labels)

    @property
    def n_labels(self) -> int:
        return len(self.tp)

    def add(self, pred: int, gold: int) -> None:
        if not (0 <= pred < self.n_labels and 0 <= gold < self.n_labels):
            raise ValueError(f"labels must lie in [0, {self.n_labels}): pred={pred}, gold={gold}")
        self.n += 1
        if pred == gold:
            self.correct += 1
            self.tp[gold] += 1
        else:
            self.fp[pred] += 1
            self.fn[gold] += 1

    def merge(self, other: ClassCounts) -> None:
        if other.n_labels != self.n_labels:
            raise ValueError(f"cannot merge counts over {other.n_labels} labels into {self.n_labels}")
        self.n += other.n
        self.correct += other.correct
        for mine, theirs in ((self.tp, other.tp), (self.fp, other.fp), (self.fn, other.fn)):
            mine[:] = [a + b for a, b in zip(mine, theirs, strict=True)]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the labels seen in gold or predictions (sklearn's average="macro" over those labels);
        a label never seen would count as F1 0 (or 1) and move the mean for no reason."""
        f1s = [
            2 * t / (2 * t + p + n) for t, p, n in zip(self.tp, self.fp, self.fn, strict=True) if t + p + n
        ]
        return sum(f1s) / len(f1s) if f1s else 0.0

    def to_metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat scalar keys (`n`, `correct`, `tp_0`, ..., `fn_K`): what a Flower metrics record carries."""
        out = {f"{prefix}n": float(self.n), f"{prefix}correct": float(self.correct)}
        for name, values in (("tp", self.tp), ("fp", self.fp), ("fn", self.fn)):
            out.update({f"{prefix}{name}_{i}": float(v) for i, v in enumerate(values)})
        return out

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], n_labels: int, prefix: str = "") -> ClassCounts:
        """The inverse of to_metrics, for counts from an untrusted client: missing keys count 0; a count
        that is negative, non-finite or fractional, a label outside [0, n_labels), or more correct than
        examples raises ValueError. Keys without the prefix, or of other metrics, are left alone."""
        counts = cls.zeros(n_labels)
        counts.n = _count(metrics.get(f"{prefix}n", 0), f"{prefix}n")
        counts.correct = _count(metrics.get(f"{prefix}correct", 0), f"{prefix}correct")
        if counts.correct > counts.n:
            raise ValueError(f"{prefix}correct={counts.correct} exceeds {prefix}n={counts.n}")
        for key, value in metrics.items():
            m = _COUNT_KEY.fullmatch(key[len(prefix) :]) if key.startswith(prefix) else None
            if m is None:
                continue
            label = int(m.group(2))
            if label >= n_labels:
                raise ValueError(f"{key}: label {label} outside the task's {n_labels} labels")
            getattr(counts, m.group(1))[label] = _count(value, key)
        return counts
