"""fedpeft/privacy/plan.py: the run's noise, its budget, resumes, and the DP rounds on the server."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedpeft.config import FederationConfig, PrivacyConfig, RunConfig
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
    history = [{"round": 0}, {"round": 1, "dp": first.metrics(1, 5, {})}]
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
    m = p.metrics(3, 4, {"a": {"dp_clipped": 1.0}, "b": {"dp_clipped": 0.0}, "c": {}})
    assert m["epsilon"] == epsilon(1.1, 0.25, 3, 1e-5) and m["sampling"] == "poisson" and m["q"] == 0.25
    assert m["counted"] == 4 and m["clipped_fraction"] == 0.5 and "budget" not in m


def test_a_plain_dp_round_clips_again_on_the_server_and_divides_by_the_expected_count() -> None:
    """With negligible noise the update is the sum of the clipped deltas over q x N, whatever a client
    sent: an unclipped delta from a faulty client is clipped here too."""
    from fedpeft.rounds import plain_round
    from tests.test_federation import _state
    from tests.test_rounds import B, _update

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
    from fedpeft.simulate import summary as run_summary

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
    from fedpeft.federation import plan_run

    cfg = replace(_cfg(epsilon=1e-4), federation=FederationConfig(clients=20, fraction=1.0, rounds=50))
    with pytest.raises(FedpeftError, match="cannot hold for 50 rounds"):
        plan_run(tmp_path / "run", cfg, resume=False, resume_from=None)
    assert not (tmp_path / "run").exists()
