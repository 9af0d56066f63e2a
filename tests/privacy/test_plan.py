"""fedpeft/privacy/plan.py: the run's noise, its budget, resumes, and the DP rounds on the server."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedpeft.config.tree import FederationConfig, PrivacyConfig, RunConfig
from fedpeft.errors import FedpeftError
from fedpeft.privacy.accountant import epsilon
from fedpeft.privacy.plan import DpPlan, plan


def _cfg(**dp) -> RunConfig:
    return RunConfig(
        federation=FederationConfig(clients=20, fraction=0.25, rounds=4),
        privacy=PrivacyConfig(mode="central", **dp),
    )


def test_a_budget_is_spent_by_the_planned_rounds_and_never_past_them() -> None:
    p = plan(_cfg(epsilon=4.0), clients=20)
    assert p is not None and p.delta == 1e-5 and p.expected_clients == 5.0
    assert p.epsilon(4) == pytest.approx(4.0, rel=1e-3) and p.allows(4)
    assert not p.allows(5)  # one more round would spend more
    fixed = plan(_cfg(noise_multiplier=1.3), clients=20)
    assert fixed.noise_multiplier == 1.3 and fixed.allows(10_000)  # no budget: report only
    assert plan(RunConfig(), clients=20) is None


def test_delta_defaults_below_one_over_the_clients() -> None:
    assert plan(_cfg(noise_multiplier=1.0), clients=20).delta == 1e-5
    assert plan(_cfg(noise_multiplier=1.0), clients=10**6).delta == pytest.approx(1e-7)
    assert plan(_cfg(noise_multiplier=1.0, delta=1e-3), clients=20).delta == 1e-3


def test_a_resumed_run_keeps_the_noise_its_rounds_ran_with() -> None:
    first = plan(_cfg(epsilon=4.0), clients=20)
    history = [{"round": 0}, {"round": 1, "dp": first.metrics([{"round": 0}], {"accepted": ["a"] * 5})}]
    longer = replace(_cfg(epsilon=4.0), federation=FederationConfig(clients=20, fraction=0.25, rounds=8))
    again = plan(longer, 20, history)
    assert again.noise_multiplier == first.noise_multiplier and not again.allows(5)
    with pytest.raises(FedpeftError, match="resume it with the same"):
        plan(_cfg(epsilon=4.0, clip=0.1), 20, history)
    with pytest.raises(FedpeftError, match="trained under --dp"):
        plan(RunConfig(), 20, history)
    with pytest.raises(FedpeftError, match="1 trained rounds ran without --dp"):
        plan(_cfg(epsilon=4.0), 20, [{"round": 0}, {"round": 1}])


def test_the_round_metrics_say_what_was_spent_and_how_much_was_clipped() -> None:
    p = DpPlan("central", 0.5, 1.1, 0.25, 1e-5, 20, 0.0)
    before = [
        {"round": 0},
        {"round": 1, "dp": {"noise_multiplier": 1.1}},
        {"round": 2, "dp": {"noise_multiplier": 1.1}},
    ]
    clients = {"a": {"dp_clipped": 1.0}, "b": {"dp_clipped": 0.0}, "c": {}}
    m = p.metrics(before, {"accepted": ["a", "b", "c", "d"], "client_seconds": clients})
    assert m["epsilon"] == epsilon(1.1, 0.25, 3, 1e-5) and m["sampling"] == "poisson" and m["q"] == 0.25
    assert m["counted"] == 4 and m["clipped_fraction"] == 0.5 and "budget" not in m
    # a skipped central round still counts: the server would have added noise to what it had
    assert p.metrics(before, {"skipped": True})["epsilon"] == m["epsilon"]


def _distributed(**dp) -> RunConfig:
    return RunConfig(
        federation=FederationConfig(clients=20, fraction=0.5, rounds=4, secagg=True),
        privacy=PrivacyConfig(mode="distributed", dropout_margin=0.2, **dp),
    )


def test_distributed_rounds_are_accounted_with_the_noise_their_survivors_added() -> None:
    """The plan sizes noise for 8 of the 10 expected clients (margin 0.2). A round whose sum held 6
    clients' noise spends more than planned, one with 10 less, one never unmasked nothing."""
    from fedpeft.privacy.accountant import epsilon_of_rounds

    p = plan(_distributed(epsilon=6.0), clients=20)
    assert p.discrete and p.counted_min == 8 and p.epsilon(4) == pytest.approx(6.0, rel=1e-3)
    z = p.noise_multiplier

    def round_(s: int | None) -> dict:
        if s is None:
            return {"skipped": True}
        return {"dp_sum": {"counted": s, "noise_multiplier": z * (s / 8) ** 0.5, "tau_d": 0.0,
                           "local_multiplier": z / 8**0.5, "clipped": 1.0}}  # fmt: skip

    history: list[dict] = [{"round": 0}]
    for r, s in enumerate([8, 6, None, 10], start=1):
        history.append({"round": r, "dp": p.metrics(history, round_(s))})
    dps = [h["dp"] for h in history[1:]]
    assert [d["counted"] for d in dps] == [8, 6, 0, 10] and dps[2]["round_noise_multiplier"] is None
    zs = (z, z * (6 / 8) ** 0.5, z * (10 / 8) ** 0.5)
    assert dps[-1]["epsilon"] == epsilon_of_rounds(zs, 0.5, p.delta)
    assert dps[1]["epsilon"] > p.epsilon(2)  # fewer survivors than the margin allows: more spent
    assert dps[2]["epsilon"] == dps[1]["epsilon"]  # nothing unmasked, nothing spent
    assert dps[0]["clipped_fraction"] == 1 / 8 and dps[0]["dropout_margin"] == 0.2
    # the check before a fifth round: the rounds so far and one more as planned exceed the budget
    assert not p.allows_spent(p.next_round(history))


def test_distributed_dp_needs_secure_aggregation() -> None:
    from fedpeft.config.tree import validate

    with pytest.raises(FedpeftError, match="needs --secagg"):
        validate(replace(_distributed(noise_multiplier=1.0), federation=FederationConfig(clients=20)))


def test_a_plain_dp_round_clips_again_on_the_server_and_divides_by_the_expected_count() -> None:
    """With negligible noise the update is the sum of the clipped deltas over q x N, whatever a client
    sent: an unclipped delta from a faulty client is clipped here too."""
    from fedpeft.federation.rounds import plain_round
    from tests.federation.test_federation import _state
    from tests.federation.test_rounds import B, _update

    state = _state()
    replies = {0: _update(10.0, 1.0, 1.0), 1: _update(0.01, 1.0, 1.0)}
    cfg = RunConfig(federation=FederationConfig(clients=8, min_clients=1))
    dp = DpPlan("central", 1.0, 1e-12, 0.5, 1e-5, 8, 0.0)  # expected 4 clients
    new, m = plain_round(state, cfg, {0: "a", 1: "b"}, [0, 1], replies, dp)
    step = new.arrays[B] - state.arrays[B]
    big, small = np.full((4, 2), 10.0), np.full((4, 2), 0.01)
    assert step == pytest.approx((big / np.linalg.norm(big) + small) / 4, rel=1e-4)
    assert m["accepted"] == ["a", "b"]


def test_the_summary_line_ends_with_the_guarantee() -> None:
    from fedpeft.privacy.plan import summary
    from fedpeft.simulation.run import summary as run_summary

    last = {
        "round": 1,
        "eval_ppl": 28.0,
        "accepted": ["a"],
        "bytes_up": 10,
        "dp": {"epsilon": 3.2, "delta": 1e-5},
    }
    assert summary(last) == " (ε = 3.20, δ = 1e-05)" and summary({"round": 1}) == ""
    assert run_summary(1, [{"round": 0, "eval_ppl": 30.0}, last]).endswith("(ε = 3.20, δ = 1e-05)")


def test_a_budget_no_noise_can_hold_is_refused_before_the_run_folder_exists(tmp_path) -> None:
    from fedpeft.federation.state import plan_run

    cfg = replace(_cfg(epsilon=1e-4), federation=FederationConfig(clients=20, fraction=1.0, rounds=50))
    with pytest.raises(FedpeftError, match="cannot hold for 50 rounds"):
        plan_run(tmp_path / "run", cfg, resume=False, resume_from=None)
    assert not (tmp_path / "run").exists()
