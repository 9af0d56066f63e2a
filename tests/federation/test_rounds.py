"""A training round's outcome and metrics without Flower: one function for plain and secure rounds."""

import logging

import numpy as np
import pytest

from fedpeft.config.tree import FederationConfig, PersonalConfig, RunConfig
from fedpeft.federation.rounds import (
    PLAIN_STAGES,
    SECURE_STAGES,
    Progress,
    TrainResult,
    Update,
    aborted_metrics,
    aggregation_note,
    plain_round,
    secagg_rejections,
    secure_metrics,
    train_metrics,
    train_result,
)
from tests.federation.test_federation import FP, _state

B = "x.lora_B.weight"  # the travel key of tests.federation.test_federation's state (4 x 2 float32: 32 bytes)


def _update(value: float, examples: float, loss: float, fingerprint: str = FP) -> Update:
    metrics = {
        "num-examples": examples,
        "train_loss": loss,
        "train_seconds": examples / 10,
        "load_seconds": 1.0,
    }
    return Update({B: np.full((4, 2), value, np.float32)}, fingerprint, metrics)


def test_train_result_of_a_plain_round_needs_count_loss_and_time() -> None:
    r = train_result("ann", {"num-examples": 5, "train_loss": 2.5, "train_seconds": 3}, PLAIN_STAGES)
    assert r == TrainResult("ann", 5.0, 2.5, {"load": 0.0, "train": 3.0, "personal": 0.0, "wait": 0.0})
    with pytest.raises(KeyError):
        train_result("ann", {"num-examples": 5, "train_seconds": 3}, PLAIN_STAGES)


def test_train_result_of_a_secure_round_reads_what_is_there() -> None:
    r = train_result("ann", {"num-examples": -3.0, "mask_seconds": 0.25}, SECURE_STAGES, lenient=True)
    assert r.examples == 1e-12 and r.loss == 0.0
    assert r.seconds == {"load": 0.0, "train": 0.0, "mask": 0.25, "personal": 0.0, "wait": 0.0}


def test_train_result_keeps_what_a_device_says_of_itself() -> None:
    m = {"num-examples": 5, "train_loss": 2.5, "train_seconds": 3, "base_loads": 1, "peak_rss_mib": 612.5}
    r = train_result("ann", m, PLAIN_STAGES)
    assert r.seconds["base_loads"] == 1.0 and r.seconds["peak_rss_mib"] == 612.5


def test_train_metrics_weight_the_loss_by_examples() -> None:
    results = [
        TrainResult("ann", 1.0, 2.0, {"load": 0.5, "train": 4.0}),
        TrainResult("bob", 3.0, 4.0, {"load": 0.0, "train": 6.0}),
    ]
    m = train_metrics(results)
    assert m["train_loss"] == pytest.approx(3.5)
    assert m["train_seconds_max"] == 6.0 and m["train_seconds_sum"] == 10.0
    assert m["client_seconds"] == {"ann": {"load": 0.5, "train": 4.0}, "bob": {"load": 0.0, "train": 6.0}}


def test_plain_round_aggregates_the_valid_updates_and_names_the_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = _state()
    names = {0: "ann", 1: "bob", 2: "cid", 3: "dan"}
    replies = {
        3: _update(9.0, 1.0, 9.0, fingerprint="e" * 64),
        1: _update(4.0, 3.0, 4.0),
        2: "disk full",
        0: _update(1.0, 1.0, 2.0),
    }
    cfg = RunConfig(federation=FederationConfig(min_clients=2))
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        new, m = plain_round(state, cfg, names, [0, 1, 2, 3], replies)
    assert new.round == 1
    np.testing.assert_allclose(new.arrays[B], (1.0 * 1 + 4.0 * 3) / 4)  # FedAvg, server lr 1
    assert m["round"] == 1 and m["skipped"] is False
    assert m["sampled"] == ["ann", "bob", "cid", "dan"] and m["accepted"] == ["ann", "bob"]
    assert [r["client"] for r in m["rejected"]] == ["cid", "dan"]
    assert m["rejected"][0]["reason"] == "client error: disk full"
    assert m["rejected"][1]["reason"].startswith("base fingerprint eeeeeeeeeeee differs")
    assert m["bytes_up"] == 3 * 32 and m["bytes_down"] == 4 * 32
    assert m["train_loss"] == pytest.approx(3.5) and m["train_seconds_max"] == pytest.approx(0.3)
    assert m["client_seconds"]["ann"] == {
        "load": 1.0,
        "train": pytest.approx(0.1),
        "personal": 0.0,
        "wait": 0.0,
    }
    assert "refused dan" in caplog.text


def test_plain_round_with_too_few_valid_updates_leaves_the_adapter(caplog: pytest.LogCaptureFixture) -> None:
    state = _state()
    cfg = RunConfig(federation=FederationConfig(min_clients=2))
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        new, m = plain_round(state, cfg, {0: "ann", 1: "bob"}, [0, 1], {0: _update(1.0, 1.0, 2.0), 1: "gone"})
    assert new.round == 1 and new.arrays is state.arrays and new.opt_state is state.opt_state
    assert m["skipped"] is True and m["train_loss"] is None and m["accepted"] == ["ann"]
    assert "train_seconds_max" not in m
    assert "1 valid replies < min_clients 2" in caplog.text


REPORT = {
    "dropped": {1: "stage 3 (refused: too few neighbours)", 2: "stage 4"},
    "excluded": {3: "malformed share"},
    "train_metrics": {
        0: {"num-examples": 1.0, "train_loss": 2.0, "train_seconds": 5.0, "mask_seconds": 0.5},
        2: {"num-examples": 3.0, "train_loss": 4.0, "train_seconds": 7.0},
    },
    "k": 3,
    "t": 2,
    "bytes_up_keys": 1000,
}
NAMES = {0: "ann", 1: "bob", 2: "cid", 3: "dan"}


def test_secagg_rejections_name_who_is_not_in_the_sum() -> None:
    assert secagg_rejections(REPORT, [0, 2], NAMES) == [
        {"client": "bob", "reason": "dropped at stage 3 (refused: too few neighbours)"},
        {"client": "dan", "reason": "malformed share"},
    ]  # cid left after sending its input: it still counts
    assert [r["client"] for r in secagg_rejections(REPORT, [], NAMES)] == ["bob", "cid", "dan"]


def test_secure_metrics_use_the_same_training_figures_as_a_plain_round() -> None:
    m = secure_metrics(REPORT, [0, 2], NAMES, dim=9)
    assert m["accepted"] == ["ann", "cid"] and m["left_before_unmask"] == ["cid"]
    assert m["secagg_k"] == 3 and m["secagg_t"] == 2 and m["skipped"] is False
    assert m["bytes_up"] == 4 * 9 * 2 + 1000
    assert m["train_loss"] == pytest.approx(3.5) and m["train_seconds_sum"] == 12.0
    assert m["client_seconds"]["ann"] == {
        "load": 0.0,
        "train": 5.0,
        "mask": 0.5,
        "personal": 0.0,
        "wait": 0.0,
    }
    assert [r["client"] for r in m["rejected"]] == ["bob", "dan"]


def test_an_aborted_secure_round_names_who_left(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedpeft"):
        m = aborted_metrics(REPORT, NAMES, 4, "2 survivors < min_clients 3")
    assert m["skipped"] is True and m["train_loss"] is None and m["accepted"] == [] and m["bytes_up"] == 0
    assert m["abort"] == "2 survivors < min_clients 3"
    assert [r["client"] for r in m["rejected"]] == ["bob", "cid", "dan"]
    assert "round 4: secure aggregation aborted" in caplog.text
    assert aborted_metrics({}, NAMES, 1, "too few")["rejected"] == []  # aborted before stage 1


def test_aggregation_note_names_the_lora_mode() -> None:
    assert aggregation_note(RunConfig()).startswith("FedAvg of LoRA A and B")
    assert aggregation_note(RunConfig(federation=FederationConfig(lora_mode="ffa"))).startswith("FFA-LoRA")
    fedsa = RunConfig(personal=PersonalConfig(method="fedsa"))
    assert aggregation_note(fedsa).startswith("FedSA-LoRA")


def test_progress_prints_a_line_per_round(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import replace

    from fedpeft.config.tree import TrainConfig

    state = _state()
    state.history = [{"round": 0, "eval_ppl": 20.0, "eval_loss": 3.0, "quant": "nf4"}]
    progress = Progress(RunConfig(train=replace(TrainConfig(), progress=False)), state)
    m = {"eval_ppl": 12.345, "eval_loss": 2.5, "accepted": ["a"], "sampled": ["a", "b"], "seconds": 1.25}
    progress.round({**m, "round": 1, "skipped": True})
    progress.close()
    out = capsys.readouterr().out
    assert "round 0: held-out ppl 20.00 (loss 3.000) on the NF4 base\n" in out  # the base, before training
    assert "round 1: held-out ppl 12.35 (loss 2.500), 1/2 clients, 1.2 s [skipped]" in out


def test_round_line_is_the_same_for_simulate_and_server() -> None:
    from fedpeft.deploy.server import _round_line
    from fedpeft.federation.rounds import round_line

    m = {
        "round": 3,
        "eval_ppl": 31.5,
        "eval_loss": 3.45,
        "accepted": ["a"],
        "sampled": ["a", "b"],
        "seconds": 61.9,
    }
    assert round_line(m) == "round 3: held-out ppl 31.50 (loss 3.450), 1/2 clients, 61.9 s"
    assert (
        round_line({"round": 0, "eval_ppl": 38.0, "eval_loss": 3.64})
        == "round 0: held-out ppl 38.00 (loss 3.640)"
    )
    refused = {**m, "skipped": True, "rejected": [{"client": "b", "reason": "schema differs"}]}
    assert _round_line(refused) == round_line(refused) + "\n  refused b: schema differs"
    assert round_line(refused).endswith(" [skipped]")
