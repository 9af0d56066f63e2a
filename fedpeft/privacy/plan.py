"""A federation's DP plan: the noise it runs with, what each round spends, and what the metrics report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft.config.tree import RunConfig, dp_delta
from fedpeft.errors import FedpeftError
from fedpeft.privacy.accountant import SAMPLING, epsilon, epsilon_of_rounds, noise_for_budget

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
    margin: float = 0.0  # --dp-dropout-margin (distributed)

    @property
    def discrete(self) -> bool:
        return self.mode == "distributed"

    @property
    def expected_clients(self) -> float:
        return self.q * self.clients

    @property
    def counted_min(self) -> int:
        """Distributed: the survivors whose noise shares make up the planned noise (the margin's rest)."""
        return max(1, math.floor(self.expected_clients * (1 - self.margin) + 1e-9))

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    def epsilon(self, rounds: int) -> float:
        """After `rounds` rounds as planned (distributed: each with counted_min survivors)."""
        return epsilon(self.noise_multiplier, self.q, rounds, self.delta, self.discrete)

    def allows(self, rounds: int) -> bool:
        """Whether `rounds` rounds as planned stay within the budget (always, without one)."""
        return not self.budget or self.epsilon(rounds) <= self.budget * (1 + BUDGET_SLACK)

    def spent(self, ran: Sequence[tuple[float, float]]) -> float:
        """epsilon of rounds that ran with these (noise multiplier, tau x d) pairs."""
        if not self.discrete:
            return epsilon(self.noise_multiplier, self.q, len(ran), self.delta)
        return epsilon_of_rounds(tuple(z for z, _ in ran), self.q, self.delta, sum(x for _, x in ran))

    def allows_spent(self, ran: Sequence[tuple[float, float]]) -> bool:
        return not self.budget or self.spent(ran) <= self.budget * (1 + BUDGET_SLACK)

    def next_round(self, history: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
        """What the rounds so far spent, and a next round as planned: the check before a round starts."""
        return [*ran(history), (self.noise_multiplier, 0.0)]

    def metrics(
        self, history: Sequence[Mapping[str, Any]], round_metrics: Mapping[str, Any]
    ) -> dict[str, Any]:
        """metrics.jsonl's `dp` for the round whose metrics are `round_metrics`, after `history`: the
        guarantee so far, the round's noise, how many clients' clipped deltas (and, distributed, noise) the
        sum held, and which share of them the clip changed. Central: every round counts, at the planned
        noise. Distributed: a round counts with the noise its survivors added, when its sum was unmasked
        (`dp_sum`, from fedpeft.federation.secure_round)."""
        extra: dict[str, Any] = {}
        if self.discrete:
            done = round_metrics.get("dp_sum")
            counted = done["counted"] if done else 0
            this = [(done["noise_multiplier"], done["tau_d"])] if done else []
            z = done["noise_multiplier"] if done else None
            fraction = min(1.0, max(0.0, done["clipped"] / counted)) if done and counted else None
            extra = {"dropout_margin": self.margin, "counted_min": self.counted_min}
            if done:
                extra.update(local_noise_multiplier=done["local_multiplier"], tau_d=done["tau_d"])
        else:
            counted = 0 if round_metrics.get("skipped") else len(round_metrics.get("accepted", []))
            this, z = [(self.noise_multiplier, 0.0)], self.noise_multiplier
            clients = round_metrics.get("client_seconds", {})
            clipped = [float(c["dp_clipped"]) for c in clients.values() if "dp_clipped" in c]
            fraction = sum(clipped) / len(clipped) if clipped else None
        return {
            "mode": self.mode,
            "epsilon": self.spent([*ran(history), *this]),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "round_noise_multiplier": z,
            "clip": self.clip,
            "sampling": SAMPLING,
            "q": self.q,
            "counted": counted,
            "clipped_fraction": fraction,
            **extra,
            **({"budget": self.budget} if self.budget else {}),
        }


def ran(history: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    """(noise multiplier, tau x d) of each round in `history` that spent privacy. A central round always
    does; a distributed one when its sum was unmasked (round_noise_multiplier not None)."""
    out = []
    for h in history:
        dp = h.get("dp")
        if not dp:
            continue
        z = dp.get("round_noise_multiplier", dp["noise_multiplier"])
        if z is not None:
            out.append((float(z), float(dp.get("tau_d", 0.0))))
    return out


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
        z = last["noise_multiplier"]
        return DpPlan(d.mode, d.clip, z, f.fraction, last["delta"], clients, d.epsilon, d.dropout_margin)
    delta = dp_delta(d, clients)
    discrete = d.mode == "distributed"
    z = d.noise_multiplier or noise_for_budget(d.epsilon, f.fraction, f.rounds, delta, discrete)
    return DpPlan(d.mode, d.clip, z, f.fraction, delta, clients, d.epsilon, d.dropout_margin)


def summary(m: Mapping[str, Any]) -> str:
    """' (ε = 3.21, δ = 1e-05)' for a round's metrics under DP, else ''."""
    dp = m.get("dp")
    return f" (ε = {dp['epsilon']:.2f}, δ = {dp['delta']:.2g})" if dp else ""


def note(p: DpPlan, rounds: int) -> str:
    """The line a run logs at its start."""
    budget = f" of a budget of {p.budget:g}" if p.budget else ""
    where = (
        f"discrete Gaussian noise {p.noise_multiplier:.4g} x the clip on the sum, added in shares by the "
        f"clients inside secure aggregation and sized for {p.counted_min} survivors"
        if p.discrete
        else f"Gaussian noise {p.noise_multiplier:.4g} x the clip on the sum"
    )
    return (
        f"differential privacy: {p.mode}, deltas clipped to L2 norm {p.clip:g}, {where}, clients "
        f"Poisson-sampled with q = {p.q:g} of {p.clients} (expected {p.expected_clients:.3g} a round); after "
        f"{rounds} rounds as planned ε = {p.epsilon(rounds):.3g}{budget} at δ = {p.delta:.2g}"
    )
