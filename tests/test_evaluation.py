"""A round's evaluation metrics without Flower: weighting, perplexity, personal reports, base perplexity."""

import logging
import math

import pytest

from fedpeft.config import FederationConfig, PersonalConfig, RunConfig
from fedpeft.evaluation import EvalResult, add_base, eval_metrics, personal_entry, personal_round, ppl


def test_eval_metrics_weight_the_loss_by_tokens_and_sort_clients_by_name() -> None:
    m = eval_metrics([EvalResult("bob", 2.0, 30), EvalResult("ann", 1.0, 10)])
    assert m["eval_loss"] == pytest.approx(1.75) and m["eval_tokens"] == 40
    assert m["eval_ppl"] == pytest.approx(math.exp(1.75))
    assert m["eval_ppl_client_mean"] == pytest.approx((math.e + math.exp(2.0)) / 2)
    assert list(m["eval_per_client"]) == ["ann", "bob"]
    assert m["eval_per_client"]["bob"] == {"loss": 2.0, "ppl": pytest.approx(math.exp(2.0)), "tokens": 30}


def test_no_reply_gives_zeros_not_a_division_error() -> None:
    m = eval_metrics([])
    assert m["eval_loss"] == 0.0 and m["eval_ppl"] == 1.0 and m["eval_tokens"] == 0
    assert m["eval_ppl_client_mean"] == 0.0 and m["eval_per_client"] == {}


def test_perplexity_is_capped() -> None:
    assert ppl(1000.0) == math.exp(50.0) and ppl(0.0) == 1.0


def test_a_malformed_personal_report_is_left_out_and_the_others_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = {"kept": "personal", "personal_seconds": 0.5, "personal_eval_loss": 1.0, "val_loss_personal": 0.9}
    results = [
        EvalResult("ann", 2.0, 10, good),
        EvalResult("bob", 2.0, 10, {"note": "no kept, no seconds"}),
        EvalResult("cid", 2.0, 10, {"kept": "global", "personal_seconds": "soon"}),
    ]
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        per_client = eval_metrics(results)["eval_per_client"]
    assert per_client["ann"]["kept"] == "personal" and per_client["ann"]["kept_ppl"] == pytest.approx(math.e)
    assert per_client["ann"]["val_loss_personal"] == 0.9
    assert "kept" not in per_client["bob"] and per_client["bob"]["tokens"] == 10
    assert "kept" not in per_client["cid"]
    assert "malformed personal report from bob" in caplog.text and "from cid" in caplog.text


def test_personal_entry_keeps_the_global_perplexity_when_the_global_adapter_is_kept() -> None:
    report = {"kept": "global", "note": "too little text", "personal_seconds": 2, "personal_eval_loss": 3.0}
    entry = personal_entry(report, global_ppl=7.0)
    assert entry == {
        "kept": "global",
        "note": "too little text",
        "personal_seconds": 2.0,
        "personal_ppl": pytest.approx(math.exp(3.0)),
        "kept_ppl": 7.0,
    }
    with pytest.raises(KeyError):  # kept personal without its loss
        personal_entry({"kept": "personal", "personal_seconds": 1.0}, 7.0)


@pytest.mark.parametrize(
    "method,rnd,expected",
    [
        ("none", 3, False),
        ("fedsa", 0, False),
        ("fedsa", 1, True),
        ("ditto", 2, True),
        ("finetune", 2, False),
        ("finetune", 3, True),
    ],
)
def test_personal_rounds(method: str, rnd: int, expected: bool) -> None:
    cfg = RunConfig(federation=FederationConfig(rounds=3), personal=PersonalConfig(method=method))
    assert personal_round(cfg, rnd) is expected


def test_add_base_takes_round_0_perplexity_and_summarizes() -> None:
    history = [{"eval_per_client": {"ann": {"ppl": 30.0}, "bob": {"ppl": 40.0}}}]
    metrics = eval_metrics(
        [
            EvalResult(
                "ann", 2.0, 10, {"kept": "personal", "personal_seconds": 1, "personal_eval_loss": 1.0}
            ),
            EvalResult("bob", 2.0, 10),
        ]
    )
    add_base(metrics, history)
    assert metrics["eval_per_client"]["ann"]["base_ppl"] == 30.0
    assert "base_ppl" not in metrics["eval_per_client"]["bob"]  # no personal figures: not a personal row
    assert metrics["personal"]["users"] == 1 and metrics["personal"]["beats_global"] == 1
    plain = eval_metrics([EvalResult("bob", 2.0, 10)])
    add_base(plain, history)
    assert "personal" not in plain
