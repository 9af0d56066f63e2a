"""The base's fingerprint: what makes "every client runs the very same frozen base" checkable.

A sha256 over the quantized tensors' names, shapes, dtypes and bytes plus the quantization settings;
adapter deltas from clients whose bases differ do not add up.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from fedpeft.model.quant import quant_settings

FINGERPRINT_VERSION = 1


def unique_tensors(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Each storage once: tied weights (embeddings = lm_head) appear under two names."""
    seen: set[tuple[int, int]] = set()
    out = []
    for t in state.values():
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def fingerprint(model: Any, quant: str) -> str:
    """sha256 over (name, shape, dtype, bytes) of every base tensor, sorted by name, plus quant settings.

    Computed on the quantized tensors, so the same checkpoint under nf4 and int8 gives two fingerprints,
    and bitsandbytes' quant-state tensors (absmax, quant_map) are covered too.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"v": FINGERPRINT_VERSION, **quant_settings(quant)}, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
