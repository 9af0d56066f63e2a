"""fedpeft/privacy/accountant.py against dp-accounting used directly, and the budget's calibration."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp

from fedpeft.errors import FedpeftError
from fedpeft.privacy.accountant import INTEGER_ORDERS, epsilon, epsilon_of_rounds, noise_for_budget


def _independent(z: float, q: float, rounds: int, delta: float) -> float:
    """The same event built here from dp-accounting's parts: R Poisson-sampled Gaussian rounds."""
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for _ in range(rounds):
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"), [(1.0, 0.3, 5, 1e-5), (0.7, 0.05, 100, 1e-6), (4.0, 1.0, 3, 1e-5)]
)
def test_epsilon_equals_dp_accountings_for_the_same_event(
    z: float, q: float, rounds: int, delta: float
) -> None:
    assert epsilon(z, q, rounds, delta) == pytest.approx(_independent(z, q, rounds, delta), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    assert epsilon(1.0, 0.3, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.3, 1, 1e-5) == float("inf")
    assert epsilon(1.0, 0.3, 2, 1e-5) < epsilon(1.0, 0.3, 4, 1e-5)
    assert epsilon(2.0, 0.3, 4, 1e-5) < epsilon(1.0, 0.3, 4, 1e-5)


@pytest.mark.parametrize("budget", [2.0, 8.0])
def test_the_calibrated_noise_spends_the_budget_and_no_less_noise_would_do(budget: float) -> None:
    z = noise_for_budget(budget, 0.2, 20, 1e-5)
    assert epsilon(z, 0.2, 20, 1e-5) <= budget * (1 + 1e-6)
    assert epsilon(z * 0.99, 0.2, 20, 1e-5) > budget


def test_a_budget_no_noise_can_hold_is_refused_in_one_line() -> None:
    with pytest.raises(FedpeftError, match="cannot hold for 1000 rounds") as e:
        noise_for_budget(0.001, 1.0, 1000, 1e-5)
    assert "\n" not in str(e.value)


def test_distributed_rounds_equal_dp_accountings_composition_at_integer_orders() -> None:
    """Rounds with different noise (survivors) and KLS21's tau x d, built here from dp-accounting's parts."""
    zs, q, delta, xi = (1.2, 0.9, 1.2, 1.5), 0.3, 1e-5, 1e-3
    accountant = rdp.RdpAccountant(
        orders=list(range(2, 257)), neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    for z in zs:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)))
    accountant.compose(dp_accounting.ZCDpEvent(rho=0.0, xi=xi))
    assert tuple(range(2, 257)) == INTEGER_ORDERS
    assert epsilon_of_rounds(zs, q, delta, xi) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
    assert epsilon_of_rounds((), q, delta) == 0.0
    # integer orders only: never below the default orders' figure for the same rounds
    assert epsilon_of_rounds((1.2,) * 4, q, delta) >= epsilon(1.2, q, 4, delta) * (1 - 1e-9)
