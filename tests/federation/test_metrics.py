"""Typed round metrics: every metrics.jsonl line, today's and older ones, reads and writes back unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedpeft.federation.evaluation import EvalResult, add_base, eval_metrics
from fedpeft.federation.metrics import ClientEval, DpMetrics, RoundMetrics, TaskMetrics, as_history
from fedpeft.federation.rounds import TrainResult, aborted_metrics, round_line, skipped_metrics, train_metrics
from fedpeft.federation.state import write_metrics

# lines real runs wrote (plain, secure, fedsa, task, sampled evaluation, the reference text), one of each
# shape, with at most two clients each
LINES = Path(__file__).with_name("metrics_lines.jsonl")


def _roundtrip(d: dict[str, Any]) -> RoundMetrics:
    m = RoundMetrics.from_json(d)
    assert m.to_json() == d
    assert json.dumps(m.to_json(), sort_keys=True) == json.dumps(d, sort_keys=True)
    assert RoundMetrics.from_json(m.to_json()) == m
    return m


def test_every_line_real_runs_wrote_reads_typed_and_writes_back_byte_identical() -> None:
    lines = LINES.read_text().splitlines(keepends=True)
    assert len(lines) >= 6
    for line in lines:
        m = _roundtrip(json.loads(line))
        assert json.dumps(m.to_json(), sort_keys=True) + "\n" == line
        assert not m.extra  # today's keys are all typed
        assert m.eval_ppl is not None and all(isinstance(c, ClientEval) for c in m.clients.values())
    history = as_history([json.loads(line) for line in lines])
    assert [m.round for m in history] == [0, 0, 2, 2, 3, 3]
    assert history[0].nulls == {"train_loss"} and history[0].train_loss is None  # null, not left out
    assert {m.task.kind for m in history if m.task} == {"classify", "generate"}
    assert any(m.secagg and m.secagg_k for m in history) and any(m.personal for m in history)


def test_lines_the_round_loop_builds_today_round_trip() -> None:
    from fedpeft.federation.task_eval import client_entry
    from fedpeft.privacy.plan import DpPlan

    task = client_entry({"task_n": 4.0, "task_correct": 3.0, "task_tp_0": 2.0, "task_tp_1": 1.0,
                         "task_fp_1": 1.0, "task_fn_0": 1.0})  # fmt: skip
    zero = {
        "round": 0,
        "quant": "nf4",
        **eval_metrics([EvalResult("ann", 3.0, 10, task=task)]),
        "train_loss": None,
    }
    trained = [TrainResult("ann", 10.0, 2.5, {"train": 1.0, "load": 0.5, "dp_clipped": 1.0})]
    one = {"round": 1, "sampled": ["ann"], "accepted": ["ann"], "rejected": [], "bytes_up": 64, "bytes_down": 64,
           "skipped": False, **train_metrics(trained), **eval_metrics([EvalResult("ann", 2.5, 10, task=task)])}  # fmt: skip
    add_base(one, [zero])
    central = DpPlan("central", 1.0, 1.1, 0.5, 1e-5, 4, 0.0)
    one["dp"] = central.metrics([zero], one)
    skipped = {"round": 2, "sampled": ["ann", "bob"], "rejected": [{"client": "bob", "reason": "schema differs"}],
               **skipped_metrics(accepted=[], bytes_up=0), "kept_previous": "it forgets"}  # fmt: skip
    aborted = {"round": 3, **aborted_metrics({"dropped": {}, "excluded": {}}, {}, 3, "too few survivors")}
    distributed = DpPlan("distributed", 1.0, 1.1, 0.5, 1e-5, 4, 0.0, 0.1)
    aborted["dp"] = distributed.metrics([zero, one], aborted)  # no sum unmasked: its noise is null
    failed = {"round": 4, **eval_metrics([]), "train_loss": 2.0, "seconds": 3.5}
    for d in (zero, one, skipped, aborted, failed):
        _roundtrip(json.loads(json.dumps(d)))
        _roundtrip(d)  # as the loop holds it, before any JSON
    m = RoundMetrics.from_json(one)
    assert isinstance(m.dp, DpMetrics) and m.dp.mode == "central" and m.dp.epsilon > 0
    assert (
        isinstance(m.task, TaskMetrics) and m.task.accuracy == pytest.approx(0.75) and m.task.base is not None
    )
    assert m.clients["ann"].task == task and m.client_seconds["ann"]["dp_clipped"] == 1.0
    dp = RoundMetrics.from_json(aborted).dp
    assert dp.round_noise_multiplier is None and "round_noise_multiplier" in dp.nulls
    assert RoundMetrics.from_json(failed).eval_failed and round_line(failed).startswith(
        "round 4: not evaluated"
    )


def test_old_lines_keep_what_this_version_does_not_type() -> None:
    old = [
        # an early round 0: no quant, an int loss (stays an int: "5", not "5.0")
        {"round": 0, "eval_loss": 5, "eval_ppl": 148.4, "eval_per_client": {"a": {"ppl": 10.0}}, "train_loss": None},
        # figures that older versions wrote and this one does not type, at every level
        {"round": 1, "eval_loss": 3.0, "eval_ppl": 20.0, "hwm_mib": 812.5, "mask_seconds": 0.25,
         "eval_per_client": {"a": {"ppl": 20.0, "tokens": 5, "eval_peak_mib": 300}},
         "dp": {"epsilon": 1.5, "delta": 1e-5, "accountant": "rdp"}, "task": {"kind": "classify", "legacy": 1},
         "personal": {"users": 2, "beats_global": 1}, "extra": "a key named like a field of the record"},
        # shapes this version reads otherwise: kept as they were, not forced into a type
        {"round": 2, "eval_per_client": [["a", 3.0]], "dp": "central", "task": None, "skipped": None},
    ]  # fmt: skip
    for d in old:
        _roundtrip(d)
    first, second, third = (RoundMetrics.from_json(d) for d in old)
    assert first.eval_loss == 5 and isinstance(first.eval_loss, int)
    assert second.extra == {
        "hwm_mib": 812.5,
        "mask_seconds": 0.25,
        "extra": "a key named like a field of the record",
    }
    assert second.clients["a"].extra == {"eval_peak_mib": 300} and second.dp.extra == {"accountant": "rdp"}
    assert second.task.extra == {"legacy": 1} and second.personal == {"users": 2, "beats_global": 1}
    assert third.eval_per_client is None and third.extra["eval_per_client"] == [["a", 3.0]]
    assert third.dp is None and third.extra["dp"] == "central" and third.nulls == {"task", "skipped"}


def test_metrics_jsonl_is_rewritten_byte_identical(tmp_path: Path) -> None:
    text = LINES.read_text()
    history = [json.loads(line) for line in text.splitlines()]
    write_metrics(tmp_path, history)
    assert (tmp_path / "metrics.jsonl").read_text() == text
    write_metrics(tmp_path, as_history(history))  # typed or not, the same bytes
    assert (tmp_path / "metrics.jsonl").read_text() == text
    write_metrics(tmp_path, [])
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_record_reads_as_its_dict_did_in_a_condition() -> None:
    assert not DpMetrics() and not TaskMetrics.from_json({}) and DpMetrics(epsilon=0.0)
    assert not RoundMetrics.from_json({"round": 1, "dp": {}}).dp  # `if m.dp:` as `if m.get("dp"):`


def test_trackers_get_the_rounds_figures_by_name() -> None:
    line = json.loads(LINES.read_text().splitlines()[-1])
    m = RoundMetrics.from_json({**line, "dp": {"epsilon": 1.5, "delta": 1e-5, "mode": "central"}})
    s = m.scalars()
    assert s["eval/ppl"] == m.eval_ppl and s["train/loss"] == m.train_loss and s["bytes/up"] == m.bytes_up
    assert s["dp/epsilon"] == 1.5 and "dp/mode" not in s  # names and lists are not figures
    assert s["task/accuracy"] == m.task.accuracy and s["clients/accepted"] == len(m.accepted)
    assert s["round/skipped"] == 0.0 and all(isinstance(v, float) for v in s.values())
    assert RoundMetrics(round=0).scalars() == {}
