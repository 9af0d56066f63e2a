"""A round's evaluation metrics without Flower: weighting, perplexity, personal reports, base perplexity."""

import logging
import math

import pytest

from fedpeft.config.tree import BaseConfig, FederationConfig, PersonalConfig, RunConfig
from fedpeft.federation.evaluation import (
    EvalResult,
    add_base,
    eval_metrics,
    personal_entry,
    personal_round,
    ppl,
)


def test_eval_metrics_weight_the_loss_by_tokens_and_sort_clients_by_name() -> None:
    m = eval_metrics([EvalResult("bob", 2.0, 30), EvalResult("ann", 1.0, 10)])
    assert m["eval_loss"] == pytest.approx(1.75) and m["eval_tokens"] == 40
    assert m["eval_ppl"] == pytest.approx(math.exp(1.75))
    assert m["eval_ppl_client_mean"] == pytest.approx((math.e + math.exp(2.0)) / 2)
    assert list(m["eval_per_client"]) == ["ann", "bob"]
    assert m["eval_per_client"]["bob"] == {"loss": 2.0, "ppl": pytest.approx(math.exp(2.0)), "tokens": 30}


def test_no_reply_is_not_evaluated_not_a_perplexity_of_one() -> None:
    from fedpeft.federation.rounds import round_line
    from fedpeft.simulation.run import summary

    m = eval_metrics([])
    assert m == {"eval_failed": True}  # no figures: nothing reads it as ppl 1.00
    history = [{"round": 0, **eval_metrics([EvalResult("ann", 2.0, 10)])}, {"round": 1, **m}]
    add_base(history[1], history[:1])
    assert round_line(history[1]).startswith("round 1: not evaluated (every client's evaluation failed)")
    assert summary(1, history).startswith("global adapter after round 1: not evaluated (every client's")
    assert "held-out ppl 7.39;" in summary(
        1, [{"round": 0, **m}, history[0]]
    )  # no base figure: the adapter's alone


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


def test_full_base_figures_are_token_weighted_and_every_round_names_both_bases() -> None:
    from fedpeft.federation.evaluation import changes_text, full_base_round
    from fedpeft.federation.rounds import round_line

    first = eval_metrics(
        [EvalResult("ann", 3.0, 10, full_loss=2.0), EvalResult("bob", 3.0, 30, full_loss=2.5)]
    )
    assert first["full_eval_loss"] == pytest.approx(2.375) and first["full_eval_clients"] == 2
    assert first["eval_per_client"]["ann"]["full_ppl"] == pytest.approx(math.exp(2.0))
    first.update(round=0, quant="nf4", full_base="fp32")
    assert "quantizing costs +86.8%" in round_line(first) and "on the NF4 base" in round_line(first)
    later = eval_metrics([EvalResult("ann", 2.5, 40)])
    later["round"] = 1
    add_base(later, [first])
    assert later["vs_base"] == pytest.approx(math.exp(2.5) / math.exp(3.0) - 1)
    # bob did not answer: both bases are taken on ann alone, the clients this round evaluated
    assert later["base_clients"] == 1 and later["vs_full_base"] == pytest.approx(
        math.exp(2.5) / math.exp(2.0) - 1
    )
    assert changes_text(later) == (
        f"-39.3% vs the NF4 base {math.exp(3.0):.2f}, +64.9% vs the fp32 base {math.exp(2.0):.2f}"
    )
    assert changes_text(later) in round_line(later)
    cfg = RunConfig(federation=FederationConfig(rounds=3))
    assert [full_base_round(cfg, r, "nf4") for r in range(4)] == [True, False, False, True]
    assert not full_base_round(RunConfig(base=BaseConfig(full_base="off")), 0, "nf4")
    assert not full_base_round(cfg, 0, "bf16")  # the devices' base is the unquantized one already
    assert full_base_round(RunConfig(base=BaseConfig(full_base="fp32")), 0, "bf16")


def test_a_run_without_the_full_base_reports_the_quantized_change_only() -> None:
    from fedpeft.federation.evaluation import changes_text

    first = eval_metrics([EvalResult("ann", 3.0, 10)]) | {"round": 0}
    later = eval_metrics([EvalResult("ann", 2.0, 10)])
    add_base(later, [first])
    assert "vs_full_base" not in later and changes_text(later).startswith("-63.2% vs the quantized base")


def test_specificity_on_a_crafted_two_user_case() -> None:
    """ann's personal adapter lowers her loss by 0.1 nats and bob's by 0.02: own gain 1 - e^-0.1 (9.5%),
    gain on others 1 - e^-0.02 (2.0%), specificity their ratio (4.8); bob's helps ann more than him."""
    ann = {"kept": "personal", "personal_seconds": 1.0, "personal_eval_loss": 1.9}
    ann |= {"others_loss_global": 2.0, "others_loss_personal": 1.98, "others": 1}
    bob = {"kept": "personal", "personal_seconds": 1.0, "personal_eval_loss": 2.99}
    bob |= {"others_loss_global": 2.0, "others_loss_personal": 2.1, "others": 1}
    m = eval_metrics([EvalResult("ann", 2.0, 10, ann), EvalResult("bob", 3.0, 10, bob)])
    a, b = m["eval_per_client"]["ann"], m["eval_per_client"]["bob"]
    assert a["own_gain"] == pytest.approx(1 - math.exp(-0.1))
    assert a["others_gain"] == pytest.approx(1 - math.exp(-0.02))
    assert a["specificity"] == pytest.approx((1 - math.exp(-0.1)) / (1 - math.exp(-0.02)))
    assert b["others_gain"] < 0 and b["specificity"] == pytest.approx((1 - math.exp(-0.01)) / 0.001)
    add_base(m, [{"eval_per_client": {}}])
    s = m["personal"]
    assert s["specificity_users"] == 2
    assert s["specificity_median"] == pytest.approx((a["specificity"] + b["specificity"]) / 2)
    from fedpeft.federation.personal_summary import summary_line

    assert "specificity median" in summary_line(s, "finetune")


def test_an_adapter_that_hurts_its_own_user_is_not_specific() -> None:
    from fedpeft.federation.personal_summary import specificity

    assert specificity(-0.24, -0.38) == 0.0 and specificity(0.04, 0.02) == pytest.approx(2.0)


def test_a_full_base_some_devices_skipped_is_compared_on_the_devices_that_ran_it() -> None:
    """A device whose --max-memory cannot hold the unquantized base skips it: round 0's full-base figure
    then covers fewer clients, and later rounds compare against it on those clients only."""
    first = eval_metrics([EvalResult("ann", 3.0, 10, full_loss=2.0), EvalResult("bob", 4.0, 30)])
    assert first["full_eval_clients"] == 1 and first["full_eval_loss"] == pytest.approx(2.0)
    first["round"] = 0
    later = eval_metrics([EvalResult("ann", 2.5, 10), EvalResult("bob", 3.5, 30)])
    add_base(later, [first])
    assert later["full_base_clients"] == 1
    assert later["vs_full_base"] == pytest.approx(math.exp(2.5) / math.exp(2.0) - 1)  # ann's alone
    assert later["vs_base"] == pytest.approx(later["eval_ppl"] / first["eval_ppl"] - 1)  # everyone's


def test_the_evaluation_schedule_spares_rounds_and_clients_but_never_the_first_or_last_round() -> None:
    from fedpeft.federation.evaluation import eval_clients

    clients = list(range(20))
    cfg = RunConfig(federation=FederationConfig(clients=20, rounds=7, eval_every=3, fraction_evaluate=0.25))
    picked = {r: eval_clients(cfg, r, clients) for r in range(8)}
    assert [r for r in range(8) if picked[r]] == [0, 3, 6, 7]  # the first and the last round always
    assert {len(p) for p in picked.values() if p} == {5} and picked[3] != picked[6]
    assert eval_clients(cfg, 3, clients) == picked[3]  # a function of seed and round: a resume agrees
    every = RunConfig(federation=FederationConfig(clients=20, rounds=7))
    assert all(eval_clients(every, r, clients) == clients for r in range(8))
    # personal adapters are reported in the last round: every client then
    personal = RunConfig(federation=cfg.federation, personal=PersonalConfig(method="finetune"))
    assert eval_clients(personal, 7, clients) == clients and len(eval_clients(personal, 6, clients)) == 5


def test_a_sampled_evaluation_is_compared_with_the_base_on_the_same_clients() -> None:
    """Each sampled client reports the base on its own text: the change is on the same clients and text,
    whichever clients round 0 sampled."""
    base = eval_metrics([EvalResult("ann", math.log(30.0), 100)])  # round 0 sampled ann only
    history = [{**base, "round": 0, "quant": "bf16"}]
    sampled = eval_metrics([EvalResult("bob", math.log(45.0), 300, base_loss=math.log(60.0))])
    add_base(sampled, history)
    assert sampled["base_ppl"] == pytest.approx(60.0) and sampled["base_clients"] == 1
    assert sampled["vs_base"] == pytest.approx(-0.25)
    everyone = eval_metrics([EvalResult("ann", math.log(30.0), 100), EvalResult("bob", math.log(45.0), 300)])
    add_base(everyone, history)
    assert everyone["base_ppl"] == base["eval_ppl"] and "base_clients" not in everyone


def test_a_round_without_evaluation_adds_nothing_and_prints_so() -> None:
    from fedpeft.federation.rounds import round_line

    m = {"round": 2, "accepted": ["a"], "sampled": ["a"], "seconds": 3.0}
    add_base(m, [{"round": 0, "eval_ppl": 30.0, "eval_per_client": {}}])
    assert "vs_base" not in m and round_line(m).startswith("round 2: not evaluated (--eval-every)")


def test_a_sampled_evaluation_names_the_full_base_on_the_same_clients_too() -> None:
    base = eval_metrics([EvalResult("ann", math.log(30.0), 100, full_loss=math.log(25.0))])
    history = [{**base, "round": 0, "quant": "nf4", "full_base": "bf16"}]
    sampled = eval_metrics(
        [
            EvalResult(
                "bob", math.log(45.0), 300, full_loss=math.log(44.0), base_loss=math.log(60.0),
                full_base_loss=math.log(50.0),
            )
        ]
    )  # fmt: skip
    add_base(sampled, history)
    assert sampled["full_base_ppl"] == pytest.approx(50.0) and sampled["vs_full_base"] == pytest.approx(-0.1)


def test_a_sampled_round_without_the_full_base_claims_no_change_against_it() -> None:
    """Round 0 scored the unquantized base on its own sample; a later sample that did not load it must not
    be compared with that (other clients, other text)."""
    base = eval_metrics(
        [EvalResult("ann", 3.0, 10, full_loss=2.0), EvalResult("bob", 3.0, 30, full_loss=2.5)]
    )
    history = [{**base, "round": 0, "quant": "nf4", "full_base": "bf16"}]
    later = eval_metrics(
        [EvalResult("bob", 2.5, 30, base_loss=3.0), EvalResult("carol", 2.5, 30, base_loss=3.1)]
    )
    add_base(later, history)
    assert later["base_clients"] == 2 and "vs_full_base" not in later and "full_base_ppl" not in later
