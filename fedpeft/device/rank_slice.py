"""A device's slice of the federation's LoRA rank (HetLoRA; fedpeft.federation.ranks has the server's side).

A device of rank r keeps the federation's adapter shape (rank R) with every slice from r on at zero: it loads
the global adapter truncated to rank r, and a gradient hook zeroes the other slices' gradients, so AdamW
never moves them (a zero gradient gives a zero Adam step, and decoupled weight decay keeps a zero at zero).
Its delta is then zero outside its slice, and the same length as everyone's. The scale alpha/R stays the
federation's: a slice means the same update on every device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedpeft.config.tree import RunConfig
from fedpeft.federation.ranks import truncate

Arrays = dict[str, np.ndarray]


def _axis(name: str) -> int | None:
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


class RankSlice:
    def __init__(self, model: Any, cfg: RunConfig, full: int) -> None:
        self.full = full  # the federation's rank over the tensors that travel (0: no LoRA travels)
        self.ranks = cfg.federation.client_ranks if self.full else ()
        self.current = self.full
        if self.ranks:
            for name, p in model.named_parameters():
                axis = _axis(name)
                if axis is not None and p.requires_grad:  # FFA-LoRA's A never trains
                    p.register_hook(self._mask(axis))

    def _mask(self, axis: int) -> Any:
        def hook(grad: Any) -> Any:
            if self.current >= self.full:
                return grad
            grad = grad.clone()
            grad[(slice(None),) * axis + (slice(self.current, None),)] = 0
            return grad

        return hook

    def of(self, client: int) -> int:
        """The rank client `client` trains: --client-ranks by turns, or the federation's."""
        return self.ranks[client % len(self.ranks)] if self.ranks else self.full

    def enter(self, client: int, arrays: Arrays, cap: int = 0) -> Arrays:
        """Train as `client` from here on (at most rank `cap` when given); returns `arrays` truncated to it."""
        self.current = min(self.of(client), cap) if cap > 0 else self.of(client)
        return truncate(arrays, self.current) if self.current < self.full else arrays
