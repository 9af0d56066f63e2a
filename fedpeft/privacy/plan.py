"""A federation's DP plan: the noise it runs with, what each round spends, and what the metrics report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.config import RunConfig, dp_delta
from fedpeft.errors import FedpeftError
from fedpeft.privacy.accountant import SAMPLING, epsilon, noise_for_budget

BUDGET_SLACK = 1e-6  # relative: calibration is exact only to its tolerance


@dataclass(frozen=True)
class DpPlan:
    mode: str
    clip: float
    noise_multiplier: float
    q: float  # each client's probability of joining a round (Poisson sampling)
    delta: float
    clients: int  # the population the sample is drawn from
    budget: float  # --dp-epsilon, 0 when the noise was given

    @property
    def expected_clients(self) -> float:
        return self.q * self.clients

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, self.q, rounds, self.delta)

    def allows(self, rounds: int) -> bool:
        """Whether `rounds` rounds stay within the budget (always, without one)."""
        return not self.budget or self.epsilon(rounds) <= self.budget * (1 + BUDGET_SLACK)

    def metrics(self, rounds: int, counted: int, clients: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """metrics.jsonl's `dp` after `rounds` rounds: the guarantee so far, the round's noise, how many
        clipped deltas the sum held (`counted`) and which share of them the clip changed."""
        clipped = [float(c["dp_clipped"]) for c in clients.values() if "dp_clipped" in c]
        return {
            "mode": self.mode,
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "sampling": SAMPLING,
            "q": self.q,
            "counted": counted,
            "clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
            **({"budget": self.budget} if self.budget else {}),
        }


def plan(cfg: RunConfig, clients: int, history: Sequence[Mapping[str, Any]] = ()) -> DpPlan | None:
    """The plan for `clients` registered clients, or None without DP. A budget that no sensible noise
    can hold for the planned rounds is a one-line FedpeftError before any round. A resumed run (its
    `history` has DP rounds) keeps the noise, clip and sampling its rounds ran with, so that the account
    stays one composition of identical rounds: more --rounds then run only while the budget holds."""
    d, f = cfg.privacy, cfg.federation
    ran = [h["dp"] for h in history if h.get("dp")]
    if d.mode == "off":
        if ran:
            raise FedpeftError("this run was trained under --dp; resume it with the same --dp settings")
        return None
    if clients < 1:
        raise FedpeftError("--dp needs at least one client")
    trained = [h for h in history if h.get("round", 0) > 0]
    if trained and not ran:  # rounds without noise: no ε can be claimed for what follows them
        raise FedpeftError(
            f"this run's {len(trained)} trained rounds ran without --dp; start a new run to train under DP"
        )
    if ran:
        last = ran[-1]
        if (last["mode"], last["clip"], last["q"]) != (d.mode, d.clip, f.fraction):
            raise FedpeftError(
                f"this run's rounds ran with --dp {last['mode']} --dp-clip {last['clip']:g} --fraction "
                f"{last['q']:g}; resume it with the same"
            )
        if d.noise_multiplier and d.noise_multiplier != last["noise_multiplier"]:
            raise FedpeftError(
                f"this run's rounds ran with --dp-noise-multiplier {last['noise_multiplier']:.6g}; resume it with "
                "the same, or give --dp-epsilon"
            )
        return DpPlan(d.mode, d.clip, last["noise_multiplier"], f.fraction, last["delta"], clients, d.epsilon)
    delta = dp_delta(d, clients)
    z = d.noise_multiplier or noise_for_budget(d.epsilon, f.fraction, f.rounds, delta)
    return DpPlan(d.mode, d.clip, z, f.fraction, delta, clients, d.epsilon)


def summary(m: Mapping[str, Any]) -> str:
    """' (ε = 3.21, δ = 1e-05)' for a round's metrics under DP, else ''."""
    dp = m.get("dp")
    return f" (ε = {dp['epsilon']:.2f}, δ = {dp['delta']:.2g})" if dp else ""


def note(p: DpPlan, rounds: int) -> str:
    """The line a run logs at its start."""
    budget = f" of a budget of {p.budget:g}" if p.budget else ""
    return (
        f"differential privacy: {p.mode}, deltas clipped to L2 norm {p.clip:g}, Gaussian noise {p.noise_multiplier:.4g}"
        f" x the clip on the sum, clients Poisson-sampled with q = {p.q:g} of {p.clients} (expected "
        f"{p.expected_clients:.3g} a round); after {rounds} rounds ε = {p.epsilon(rounds):.3g}{budget} at δ = {p.delta:.2g}"
    )
