"""Plots: a device's training loss, a federation's rounds (global, per-client range, kept adapters)."""

import math

import pytest

from fedpeft.federation.metrics import RoundMetrics, as_history
from fedpeft.federation.report import _kept_ppl, federation_png, train_loss_png


def test_train_loss_png_is_a_png() -> None:
    assert train_loss_png([3.0, 2.5, 2.2], 3.1, 2.4, "lora on ann")[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_line_of_kept_adapters_weights_users_by_tokens() -> None:
    h = {
        "round": 1,
        "eval_per_client": {
            "a": {"ppl": 10.0, "kept_ppl": 5.0, "tokens": 300},
            "b": {"ppl": 20.0, "tokens": 100},  # no personal evaluation: its global adapter counts
        },
    }
    assert _kept_ppl(RoundMetrics.from_json(h)) == pytest.approx(
        math.exp((300 * math.log(5) + 100 * math.log(20)) / 400)
    )


def test_plot_survives_a_round_that_no_client_could_evaluate() -> None:
    ok = {"round": 0, "eval_loss": 3.0, "eval_ppl": 20.0, "train_loss": None}
    history = [
        {**ok, "eval_per_client": {"a": {"ppl": 20.0, "tokens": 5}}},
        {**ok, "round": 1, "eval_per_client": {}},
    ]
    assert federation_png(as_history(history))[:4] == b"\x89PNG"


def test_under_dp_the_plot_shows_the_epsilon_spent_per_round() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedpeft.federation.report import _epsilon

    ok = {
        "eval_loss": 3.0,
        "eval_ppl": 20.0,
        "train_loss": 3.1,
        "eval_per_client": {"a": {"ppl": 20.0, "tokens": 5}},
    }
    history = [{**ok, "round": 0}] + [
        {**ok, "round": r, "dp": {"epsilon": e, "delta": 1e-5}} for r, e in ((1, 1.5), (2, 2.5))
    ]
    fig, ax = plt.subplots()
    _epsilon(ax, as_history(history))
    (right,) = [a for a in fig.axes if a is not ax]
    assert list(right.lines[0].get_ydata()) == [0.0, 1.5, 2.5] and "δ = 1e-05" in right.get_ylabel()
    plt.close(fig)
    fig, ax = plt.subplots()
    _epsilon(ax, as_history([{**ok, "round": 0}, {**ok, "round": 1}]))  # no DP: no second axis
    assert fig.axes == [ax]
    assert federation_png(as_history(history))[:4] == b"\x89PNG"
