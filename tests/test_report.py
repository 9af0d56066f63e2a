"""Plots: a device's training loss, a federation's rounds (global, per-client range, kept adapters)."""

import math

import pytest

from fedpeft.report import _kept_ppl, federation_png, train_loss_png


def test_train_loss_png_is_a_png() -> None:
    assert train_loss_png([3.0, 2.5, 2.2], 3.1, 2.4, "lora on ann")[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_line_of_kept_adapters_weights_users_by_tokens() -> None:
    h = {
        "eval_per_client": {
            "a": {"ppl": 10.0, "kept_ppl": 5.0, "tokens": 300},
            "b": {"ppl": 20.0, "tokens": 100},  # no personal evaluation: its global adapter counts
        }
    }
    assert _kept_ppl(h) == pytest.approx(math.exp((300 * math.log(5) + 100 * math.log(20)) / 400))


def test_plot_survives_a_round_that_no_client_could_evaluate() -> None:
    ok = {"round": 0, "eval_loss": 3.0, "eval_ppl": 20.0, "train_loss": None}
    history = [
        {**ok, "eval_per_client": {"a": {"ppl": 20.0, "tokens": 5}}},
        {**ok, "round": 1, "eval_per_client": {}},
    ]
    assert federation_png(history)[:4] == b"\x89PNG"
