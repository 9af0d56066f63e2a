"""The server's side of task metrics: a client's counts read and checked, pooled over clients (accuracy and
macro-F1 of all examples together, not a mean of rates), compared with round 0's zero-shot base."""

from __future__ import annotations

import pytest

from fedpeft.federation.task_eval import add_task_changes, client_entry, pooled, task_summary, task_text


def counts(n: int, correct: int, tp: list[int], fp: list[int], fn: list[int]) -> dict[str, float]:
    out = {"task_n": n, "task_correct": correct}
    for i, (a, b, c) in enumerate(zip(tp, fp, fn, strict=True)):
        out |= {f"task_tp_{i}": a, f"task_fp_{i}": b, f"task_fn_{i}": c}
    return {k: float(v) for k, v in out.items()}


def test_classification_pools_the_confusion_counts() -> None:
    # client a: 4 examples, gold [0, 0, 1, 1], predicted [0, 1, 1, 1] -> 3 correct
    a = client_entry(counts(4, 3, tp=[1, 2], fp=[0, 1], fn=[1, 0]))
    # client b: 2 examples, gold [1, 1], predicted [0, 0] -> 0 correct
    b = client_entry(counts(2, 0, tp=[0, 0], fp=[2, 0], fn=[0, 2]))
    assert a is not None and b is not None
    assert a["accuracy"] == pytest.approx(0.75)
    p = pooled([a, b])
    assert p["n"] == 6 and p["accuracy"] == pytest.approx(3 / 6)
    # pooled: label 0 tp 1, fp 2, fn 1 -> F1 2/5; label 1 tp 2, fp 1, fn 2 -> F1 4/7; macro (2/5 + 4/7) / 2
    assert p["macro_f1"] == pytest.approx((2 / 5 + 4 / 7) / 2)


def test_generation_pools_sums() -> None:
    a = client_entry({"task_n": 2.0, "task_em": 1.0, "task_rouge_l": 1.5})
    b = client_entry({"task_n": 3.0, "task_em": 0.0, "task_rouge_l": 0.3})
    assert a is not None and a["rouge_l"] == pytest.approx(0.75)
    p = pooled([a, b])
    assert p == {
        "kind": "generate",
        "n": 5.0,
        "exact_match": pytest.approx(0.2),
        "rouge_l": pytest.approx(0.36),
    }


@pytest.mark.parametrize(
    "bad",
    [
        {"task_n": -1.0, "task_em": 0.0, "task_rouge_l": 0.0},
        {"task_n": 2.0, "task_em": 3.0, "task_rouge_l": 0.0},  # more exact matches than examples
        {"task_n": 2.0, "task_em": float("nan"), "task_rouge_l": 0.0},
        counts(2, 3, tp=[1, 1], fp=[0, 0], fn=[0, 0]),  # more correct than examples
        {"task_n": 1.0, "task_correct": 0.0, "task_tp_5000": 1.0},  # a label index past any label set
    ],
)
def test_a_malformed_client_report_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        client_entry(bad)


def test_no_report_is_none() -> None:
    assert client_entry({"eval_loss": 1.0}) is None


def test_a_round_is_compared_with_the_zero_shot_base_on_the_same_clients() -> None:
    base_a = client_entry(counts(4, 2, tp=[1, 1], fp=[1, 1], fn=[1, 1]))
    base_b = client_entry(counts(4, 4, tp=[2, 2], fp=[0, 0], fn=[0, 0]))
    zero = {
        "round": 0,
        "task": pooled([base_a, base_b]),
        "eval_per_client": {"a": {"task": base_a}, "b": {"task": base_b}},
    }
    now_a = client_entry(counts(4, 3, tp=[2, 1], fp=[1, 0], fn=[0, 1]))
    sampled = {"round": 1, "task": pooled([now_a]), "eval_per_client": {"a": {"task": now_a}}}
    add_task_changes(sampled, [zero])
    # only client a was evaluated: its own zero-shot accuracy (2/4), not the pooled 6/8
    assert sampled["task"]["base"] == pytest.approx(0.5)
    assert sampled["task"]["vs_base"] == pytest.approx(0.25)
    assert "+25.0 points vs the base 50.0%" in task_text(sampled)
    assert task_summary(sampled["task"]) == "accuracy 50.0% -> 75.0% (+25.0 points over the zero-shot base)"


def test_counts_that_do_not_add_up_are_refused() -> None:
    # 2 examples, 1 correct, but two true positives claimed
    with pytest.raises(ValueError, match="do not add up"):
        client_entry(counts(2, 1, tp=[2, 0], fp=[0, 1], fn=[1, 0]))


def test_a_client_reporting_another_kind_of_task_is_left_out_of_the_round() -> None:
    from fedpeft.federation.evaluation import EvalResult, eval_metrics

    good = [client_entry(counts(2, 2, tp=[1, 1], fp=[0, 0], fn=[0, 0])) for _ in range(2)]
    odd = client_entry({"task_n": 1.0, "task_em": 0.0, "task_rouge_l": 0.0})
    # the odd client comes first, in client order: it must not decide the round's kind
    results = [EvalResult("a-odd", 1.0, 10, task=odd)] + [
        EvalResult(u, 1.0, 10, task=t) for u, t in zip("bc", good, strict=True)
    ]
    m = eval_metrics(results)
    assert m["task"] == {"kind": "classify", "n": 4, "accuracy": 1.0, "macro_f1": 1.0}
    assert "task" not in m["eval_per_client"]["a-odd"]
