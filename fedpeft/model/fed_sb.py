"""Fed-SB (Singhal et al., 2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance
in (Private) Federated LoRA Fine-Tuning"): the update of a layer is s·B R A with A and B frozen and only the
r x r matrix R trained. Every client holds the same A and B, so the mean of the clients' R is the mean of their
updates, exactly, and a client sends r^2 numbers a layer instead of LoRA's r·(in + out).

A and B are the top-r singular vectors of the base weight (the data-free basis of LoRA-XS, Bałazy et al.,
2024): every device derives them from the weights the fingerprint names, with no seed and no message. Both
are orthonormal, so R's entries are the update's coordinates in that basis. Fed-SB's own basis comes from
the first gradients (LoRA-SB), which would need the clients' data before round 1.

R lives in peft's LoRA layer as `lora_R` (state key `...lora_R.weight`, next to `lora_A`/`lora_B`), applied
by a pre-hook on `lora_B`: peft's forward computes lora_B(R·lora_A(x)). A folder on disk holds the folded
plain LoRA (B' = B R, `fold`), which peft and every reader of LoRA load as they are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.errors import FedpeftError

if TYPE_CHECKING:  # torch only where a model is: the server folds adapters with numpy alone
    import torch

R_KEY = ".lora_R.weight"


def _weight(layer: Any) -> torch.Tensor:
    """The base layer's weight as the device multiplies it, in float64 (bitsandbytes' layers dequantized)."""
    import torch
    from peft.utils.integrations import dequantize_module_weight  # peft: see fedpeft.model.adapters

    return dequantize_module_weight(layer.get_base_layer()).detach().to("cpu", torch.float64)


def basis(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A): the top-r left singular vectors (out x r) and right ones (r x in) of `weight`, each pair's
    sign fixed so that B's largest entry in that column is positive: an SVD may return u, v or -u, -v
    depending on the LAPACK build and thread count, and every device must build the same basis."""
    import torch

    if r > min(weight.shape):
        raise FedpeftError(f"--lora-mode sb: rank {r} exceeds a target layer's {tuple(weight.shape)}")
    u, _, vh = torch.linalg.svd(weight, full_matrices=False)
    u, vh = u[:, :r], vh[:r]
    rows = u.abs().argmax(dim=0)
    sign = torch.sign(u[rows, torch.arange(r)])
    sign[sign == 0] = 1
    return u * sign, vh * sign[:, None]


def _layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer  # peft: see fedpeft.model.adapters

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]


def attach(model: Any, r: int) -> None:
    """Turn the peft LoRA `model` into Fed-SB: A, B set to the base's singular vectors, R = 0 (the adapter
    starts as the base), R applied between them."""
    import torch

    layers = _layers(model)
    if not layers:
        raise FedpeftError("--lora-mode sb found no LoRA layer to attach to")
    for _, layer in layers:
        with torch.no_grad():
            _attach_layer(layer, r)


def _attach_layer(layer: Any, r: int) -> None:
    import torch

    b, a = basis(_weight(layer), r)
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    lora_a.weight.copy_(a.to(lora_a.weight.dtype))
    lora_b.weight.copy_(b.to(lora_b.weight.dtype))
    inner = torch.nn.Linear(r, r, bias=False, device=lora_a.weight.device, dtype=lora_a.weight.dtype)
    torch.nn.init.zeros_(inner.weight)
    layer.lora_R = torch.nn.ModuleDict({"default": inner})
    lora_b.register_forward_pre_hook(_through(inner))


def _through(inner: torch.nn.Linear) -> Any:
    def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (inner(args[0]), *args[1:])

    return hook


def is_sb(arrays: dict[str, np.ndarray]) -> bool:
    return any(k.endswith(R_KEY) for k in arrays)


def fold(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The Fed-SB adapter as a plain LoRA of the same rank: B' = B R, A unchanged, R dropped. peft computes
    s·B'·A = s·B R A, the same update (in float32, to rounding)."""
    out = {k: v for k, v in arrays.items() if not k.endswith(R_KEY)}
    for key, inner in arrays.items():
        if not key.endswith(R_KEY):
            continue
        b_key = key[: -len(R_KEY)] + ".lora_B.weight"
        if b_key not in arrays:
            raise FedpeftError(f"Fed-SB adapter has {key} without {b_key}")
        out[b_key] = (arrays[b_key].astype(np.float64) @ inner.astype(np.float64)).astype(arrays[b_key].dtype)
    return {k: out[k] for k in sorted(out)}
