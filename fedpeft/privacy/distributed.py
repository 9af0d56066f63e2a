"""Distributed DP inside secure aggregation: the distributed discrete Gaussian (Kairouz, Liu, Steinke,
ICML 2021, "DDGauss") in fedpeft's ring Z_{2^32}. The server only ever unmasks a sum that already holds
every survivor's noise.

A client with its delta x (already clipped to L2 norm C on the device) and its clipped flag b in {0, 1}:
  1. v = [x clipped to C, b * F * C] / gamma          (F = FLAG_SCALE: the flag is one more coordinate, so
                                                       the clipped count is summed and noised securely too)
  2. v~ = conditional randomized rounding of v to L2 norm <= S = rounded_bound(C sqrt(1 + F^2) / gamma, d)
  3. y = v~ + N_Z(0, sigma^2) per coordinate, each draw clamped to +-ceil(TAIL sigma)
  4. y mod 2^32, then masked (fedpeft.secagg).
With s survivors the unmasked sum carries the sum of s discrete Gaussians; one user changes it by at most S
in L2 (add or remove one client), so the round is the Gaussian mechanism of noise multiplier
z_s = sqrt(s) sigma / S plus KLS21's tau x d (fedpeft.privacy.accountant, `discrete=True`).

No wrap-around, provably: every rounded coordinate is an integer of magnitude <= ||v~|| <= S and every noise
draw is clamped to ceil(TAIL sigma), so up to max_clients clients sum to at most
max_clients (floor(S) + ceil(TAIL sigma)) <= 2^31 - 1 in magnitude, which `check` verifies on both sides.
The clamp moves a draw only with probability < 2 exp(-TAIL^2 / 2) < 1e-86 per coordinate: the clamped
noise is within that total variation per coordinate of the discrete Gaussian, far below any delta used
(the accountant does not add it).

No random rotation: KLS21 rotate (randomized Hadamard) to flatten coordinates so that a 12-20 bit modulus
rarely wraps. fedpeft's ring has 32 bits and the bound above holds for the worst case (all of a client's
norm on one coordinate), so a rotation could only tighten a probabilistic bound we do not rely on. The
price is resolution: gamma is about C * max_clients * (1 + TAIL z / sqrt(n)) / 2^31, which rounds each
coordinate of a mean by ~1e-6 C at 20 clients and z = 1, against noise of z C per coordinate of the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedpeft.privacy.discrete import conditional_round, discrete_gaussian, rounded_bound

RING_MAX = 2**31 - 1  # the ring's signed range is [-(2^31), 2^31 - 1]
TAIL = 20.0  # each noise draw is clamped to this many standard deviations
FLAG_SCALE = 0.1  # the clipped flag's coordinate is worth 0.1 x the clip (sensitivity x 1.005)
MIN_RESOLUTION = 1000.0  # the clip norm must be at least this many ring units


def flagged_clip(clip: float) -> float:
    """The L2 norm of [x, b F C] for ||x|| <= C: the real-valued sensitivity before rounding."""
    return clip * math.sqrt(1 + FLAG_SCALE**2)


@dataclass(frozen=True)
class DistributedCode:
    clip: float  # C, in the delta's units
    granularity: float  # gamma: one ring unit, in the delta's units
    local_noise: float  # sigma: each client's discrete Gaussian standard deviation, in ring units
    max_clients: int  # sums of up to this many clients never wrap
    dim: int  # coordinates, the flag included

    @property
    def sensitivity(self) -> float:
        """S: the L2 norm of any client's rounded vector, in ring units."""
        return rounded_bound(flagged_clip(self.clip) / self.granularity, self.dim)

    @property
    def clamp(self) -> int:
        return math.ceil(TAIL * self.local_noise)

    @property
    def local_multiplier(self) -> float:
        """One client's own noise over the sensitivity: what protects it if every other client colludes."""
        return self.local_noise / self.sensitivity

    def noise_multiplier(self, survivors: int) -> float:
        """The round's Gaussian noise multiplier when `survivors` clients' noise is in the sum."""
        return math.sqrt(max(survivors, 0)) * self.local_multiplier

    def check(self) -> None:
        """Raises ValueError for parameters that are malformed or would let a sum wrap (both sides run it:
        the device never trusts the server's)."""
        values = (self.clip, self.granularity, self.local_noise)
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"clip, granularity and noise must be positive and finite, got {values}")
        if not (1 <= self.max_clients < 2**30 and 2 <= self.dim < 2**31):
            raise ValueError(f"max_clients {self.max_clients} or dim {self.dim} out of range")
        if self.clip / self.granularity < MIN_RESOLUTION:
            raise ValueError(f"granularity {self.granularity:g} too coarse for clip {self.clip:g}")
        if self.max_clients * (math.floor(self.sensitivity) + self.clamp) > RING_MAX:
            raise ValueError(
                f"{self.max_clients} clients of norm {self.sensitivity:.6g} and noise clamp {self.clamp} "
                "could wrap the ring"
            )

    @classmethod
    def for_round(
        cls, clip: float, noise_multiplier: float, counted: int, max_clients: int, dim: int
    ) -> DistributedCode:
        """The finest granularity that cannot wrap with `max_clients` clients when each adds the noise
        share that makes `counted` clients' noise a multiplier of `noise_multiplier`. ValueError when the
        ring is too small for it (huge noise or client counts)."""
        per_client = (RING_MAX / max_clients - 1) / (1 + TAIL * noise_multiplier / math.sqrt(counted))
        norm = per_client - math.sqrt(dim) - 1  # rounded_bound(norm, dim) <= norm + sqrt(dim)
        if norm < MIN_RESOLUTION:
            raise ValueError(
                f"the 32-bit ring cannot hold {max_clients} clients at noise multiplier {noise_multiplier:g} "
                f"with {counted} counted (resolution {norm:.3g} < {MIN_RESOLUTION:g} units a clip)"
            )
        granularity = flagged_clip(clip) / norm
        sensitivity = rounded_bound(norm, dim)
        local = noise_multiplier * sensitivity / math.sqrt(counted)
        code = cls(clip, granularity, local, max_clients, dim)
        code.check()
        return code

    def encode(
        self, x: np.ndarray, clipped: bool, rounding: np.random.Generator, noise: np.random.Generator
    ) -> np.ndarray:
        """[dim - 1] float delta -> [dim] uint32: clipped, flagged, rounded, noised (module docstring).
        `noise` must be secret randomness (the server must not be able to regenerate it)."""
        if x.shape != (self.dim - 1,):
            raise ValueError(f"delta of shape {x.shape}, expected ({self.dim - 1},)")
        x = x.astype(np.float64)
        norm = float(np.sqrt(np.sum(np.square(x))))
        if norm > self.clip:  # the device clipped already; clipping here keeps the bound whatever it sent
            x, clipped = x * (self.clip / norm), True
        v = np.append(x, FLAG_SCALE * self.clip * float(clipped)) / self.granularity
        rounded = conditional_round(v, self.sensitivity, rounding)
        draws = np.clip(discrete_gaussian(self.local_noise, self.dim, noise), -self.clamp, self.clamp)
        return (rounded + draws).astype(np.uint32)  # int64 -> uint32 wraps: two's complement for negatives

    def decode_sum(self, total: np.ndarray) -> tuple[np.ndarray, float]:
        """The unmasked ring sum [dim] -> (noised sum of the deltas [dim - 1], noised count of clipped
        clients)."""
        signed = total.astype(np.uint32).view(np.int32).astype(np.float64) * self.granularity
        return signed[:-1], float(signed[-1] / (FLAG_SCALE * self.clip))

    def to_task(self) -> dict[str, float | int]:
        return {
            "dp-granularity": self.granularity,
            "dp-local-noise": self.local_noise,
            "max-clients": self.max_clients,
            "dp-dim": self.dim,
        }

    @classmethod
    def from_task(cls, task: dict, clip: float, dim: int) -> DistributedCode:
        """The device's reading of a stage-3 task: the clip and the dimension are its own, the rest is
        checked (ValueError) before anything is encoded."""
        code = cls(
            clip, float(task["dp-granularity"]), float(task["dp-local-noise"]), int(task["max-clients"]), dim
        )
        code.check()
        return code
