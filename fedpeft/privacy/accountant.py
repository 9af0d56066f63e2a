"""Privacy accounting with Google's dp-accounting (RDP), for the event fedpeft runs under DP.

A DP round is DP-FedAvg's (McMahan et al., ICLR 2018): each client joins independently with probability
q (Poisson sampling, what the amplification theorem of the sampled Gaussian mechanism assumes; Mironov,
Talwar, Zhang 2019), sends its delta clipped to L2 norm C, and the server adds N(0, z^2 C^2) to the sum.
Adding or removing one user changes the sum by at most C, so one round is
PoissonSampledDpEvent(q, GaussianDpEvent(z)) under add-or-remove-one adjacency, and R rounds its R-fold
composition. Rounds that ran with too few clients to aggregate still count: the sample was drawn.

Distributed DP (`discrete=True`, fedpeft.privacy.distributed): a round whose unmasked sum holds s clients'
discrete Gaussian noise N_Z(0, sigma^2), sensitivity S, is accounted as the Poisson-sampled Gaussian of
multiplier z_s = sqrt(s) sigma / S plus KLS21's additive tau x d (Kairouz, Liu, Steinke, ICML 2021, Prop. 14,
first term; a ZCDpEvent's xi), at integer RDP orders only: at integer orders alpha the sampled mechanism's
RDP is a binomial sum of the Renyi divergences of integer orders between the noise and its shift (Mironov,
Talwar, Zhang 2019, Sec. 3.3), and for integer shifts the discrete Gaussian's equal the continuous one's
(Canonne, Kamath, Steinke, NeurIPS 2020). Rounds run with different survivors compose as they ran; a round
whose sum was never unmasked released nothing and is not counted.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import warnings
from collections.abc import Iterator

from fedpeft.errors import FedpeftError, require

SAMPLING = "poisson"
MAX_NOISE_MULTIPLIER = 1000.0  # beyond this the mean is noise: a budget that needs more is refused


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """RDP orders below 2 do not converge at large q; dp-accounting skips them and logs each through absl."""
    absl, root = logging.getLogger("absl"), logging.getLogger()
    level, handlers = absl.level, list(root.handlers)
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl.setLevel(level)
        # a module-level logging.info() in there gives the root logger a handler (logging.basicConfig),
        # which would print every fedpeft line a second time
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)


INTEGER_ORDERS = tuple(range(2, 257))


def _accountant(discrete: bool = False):
    # dp_accounting (and the scipy it pulls in): imported only when a federation runs under DP, and not in
    # a device's install
    require("dp_accounting", "server", "accounting differential privacy")
    import dp_accounting
    from dp_accounting import rdp

    return rdp.RdpAccountant(
        orders=INTEGER_ORDERS if discrete else None,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _event(z: float, q: float, rounds: int):
    import dp_accounting  # dp_accounting: see _accountant

    one = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    return dp_accounting.SelfComposedDpEvent(one, rounds)


@functools.lru_cache(maxsize=4096)
def epsilon(z: float, q: float, rounds: int, delta: float, discrete: bool = False) -> float:
    """epsilon of `rounds` DP-FedAvg rounds at noise multiplier z and sampling probability q (0 rounds: 0;
    z = 0: infinite)."""
    if rounds <= 0:
        return 0.0
    if z <= 0:
        return float("inf")
    with _quiet():
        return float(_accountant(discrete).compose(_event(z, q, rounds)).get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def epsilon_of_rounds(zs: tuple[float, ...], q: float, delta: float, xi: float = 0.0) -> float:
    """epsilon of distributed-DP rounds that ran with the noise multipliers `zs` (one per round whose sum
    was unmasked), plus `xi`, the rounds' summed tau x d, at integer orders (module docstring)."""
    import dp_accounting  # dp_accounting: see _accountant

    if not zs:
        return 0.0
    if min(zs) <= 0:
        return float("inf")
    events = [_event(z, q, n) for z, n in sorted(collections.Counter(zs).items())]
    if xi > 0:
        events.append(dp_accounting.ZCDpEvent(rho=0.0, xi=xi))
    with _quiet():
        return float(_accountant(True).compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(delta))


def noise_for_budget(budget: float, q: float, rounds: int, delta: float, discrete: bool = False) -> float:
    """The smallest noise multiplier whose `rounds` rounds spend at most `budget` (to 1e-3 relative), or a
    one-line FedpeftError when no sensible noise can hold it."""
    import dp_accounting  # dp_accounting: see _accountant

    if epsilon(MAX_NOISE_MULTIPLIER, q, rounds, delta, discrete) > budget:
        raise FedpeftError(
            f"--dp-epsilon {budget:g} cannot hold for {rounds} rounds at sampling probability {q:g} and delta "
            f"{delta:.3g}, even with noise {MAX_NOISE_MULTIPLIER:g} times the clip norm: raise the budget or "
            "lower --rounds or --fraction"
        )
    with _quiet():
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(discrete),
            lambda z: _event(z, q, rounds),
            budget,
            delta,
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    return float(z)
