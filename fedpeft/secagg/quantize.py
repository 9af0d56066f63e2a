"""Fixed-point encoding of a client's weighted, clipped delta into the ring Z_{2^32} (4 bytes/param).

A client with FedAvg weight w (its example count) and delta x sends, before masking,
    [ round(S * (w/W) * clip(x, -c, c)) ...,  round(S_w * (w/W)) ]  mod 2^32
where W is a public upper bound on any client's weight. The server's unmasked sum, read as signed
int32 and divided by the scales, is sum_i (w_i/W) x_i and sum_i (w_i/W): their ratio is the FedAvg
mean, so every aggregation mode of fedpeft.federation.aggregate composes (it needs only a sum and a weight).

Headroom: every entry of a client is at most S*c + 1 (resp. S_w + 1, the +1 from rounding up) in magnitude,
and S = (2^31 - 1 - n_max) / (n_max c), so the sum of up to n_max clients stays inside [-(2^31 - 1), 2^31 - 1]:
wrap-around is impossible by construction (tests/secagg: the worst case, n_max clients all at +c or -c).
Rounding is stochastic (unbiased); the error of the mean is at most n/(S * sum w_i/W) per entry.

Clip range c: AdamW moves each coordinate by at most about lr per step (Kingma & Ba 2015, Sec. 2.1), so
after s local steps |x| <~ lr * s; we clip at c = 2 * lr * s, which clips nothing in practice and keeps
the resolution 1/S at ~1e-9 for LoRA (lr 2e-4, 5 steps, n_max 1000).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RingCode:
    clip: float  # c: |x| is clipped to c
    max_clients: int  # n_max: sums of up to this many clients never wrap
    max_weight: float  # W: public bound on a client's weight (example count)
    # LoRA: entries after the delta carrying each rank slice's weight, and the rank the round lets a client
    # train at most (fedpeft.federation.ranks); 0: none
    slots: int = 0
    rank_cap: int = 0

    @property
    def scale(self) -> float:
        return (2**31 - 1 - self.max_clients) / (self.max_clients * self.clip)

    @property
    def weight_scale(self) -> float:
        return (2**31 - 1 - self.max_clients) / self.max_clients

    def encode(self, x: np.ndarray, weight: float, rng: np.random.Generator) -> np.ndarray:
        """[D] float -> [D + 1] uint32 (the last entry carries the weight)."""
        if not 0 < weight <= self.max_weight:
            raise ValueError(f"weight {weight} outside (0, {self.max_weight}]")
        w = weight / self.max_weight
        values = np.append(
            np.clip(x.astype(np.float64), -self.clip, self.clip) * w * self.scale, w * self.weight_scale
        )
        floor = np.floor(values)
        rounded = floor + (rng.random(values.shape) < (values - floor))  # stochastic rounding
        return rounded.astype(np.int64).astype(np.uint32)  # two's complement for negatives

    def to_task(self) -> dict[str, float | int]:
        task = {"clip": self.clip, "max-clients": self.max_clients, "max-weight": float(self.max_weight)}
        return {**task, "rank-slots": self.slots, "rank-cap": self.rank_cap} if self.slots else task

    def decode_sum(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """Unmasked ring sum [D + 1] uint32 -> (sum_i w_i x_i / W as float [D], sum_i w_i / W)."""
        signed = total.astype(np.uint32).view(np.int32).astype(np.float64)
        return signed[:-1] / self.scale, float(signed[-1] / self.weight_scale)
