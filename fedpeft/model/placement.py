"""Where the base computes: `--device auto|cpu|cuda`, and what a simulation asks Ray for per client actor.

The base is always loaded, quantized and fingerprinted on the CPU and only then moved (fedpeft.model.base), so a
GPU simulation and a CPU device hold byte-identical NF4/int8 tensors and agree on the fingerprint.
bitsandbytes moves already-quantized Params4bit/Int8Params across devices without quantizing again.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from fedpeft.errors import FedpeftError


def cuda_available() -> bool:
    import torch  # torch: the simulation's driver imports this module (actor_resources) without it

    return torch.cuda.is_available()


def resolve_device(choice: str) -> str:
    """'cpu' or 'cuda' for --device as given; `cuda` without a visible GPU is the user's error."""
    if choice == "cpu":
        return "cpu"
    if choice == "cuda":
        if not cuda_available():
            import torch  # torch: see cuda_available

            why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no GPU"
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise FedpeftError(f"--device cuda: {why} (CUDA_VISIBLE_DEVICES={visible}); use --device cpu")
        return "cuda"
    if choice == "auto":
        return "cuda" if cuda_available() else "cpu"
    raise FedpeftError(f"--device must be auto, cpu or cuda, got {choice!r}")


def model_device(model: Any) -> Any:
    """The torch device of a model's first parameter (every fedpeft model sits whole on one device)."""
    return next(model.parameters()).device


def move_model(model: Any, device: str) -> None:
    """Move a loaded base to `device` in place, quantized layers included. Module.to() swaps each
    parameter's data but leaves attributes on it: bitsandbytes' Params4bit moves its quant_state in place
    on .to(), while Int8Params keeps CB (its data) and SCB (row scales) as attributes, moved here."""
    model.to(device)
    if not getattr(model, "is_loaded_in_8bit", False):
        return
    import bitsandbytes as bnb  # bitsandbytes: only an int8 base needs it (and it logs at import)

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            weight, state = module.weight, module.state
            if getattr(weight, "CB", None) is not None:
                weight.CB = weight.data
            if getattr(weight, "SCB", None) is not None:
                weight.SCB = weight.SCB.to(device)
            for name in ("CB", "SCB"):
                if getattr(state, name, None) is not None:
                    setattr(state, name, getattr(state, name).to(device))


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def gpu_figures(device: str) -> dict[str, float]:
    """On CUDA, the peak GPU memory this process allocated (a device figure of the round's metrics)."""
    if device != "cuda":
        return {}
    import torch  # torch: see cuda_available

    return {"gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


@dataclass(frozen=True)
class ActorResources:
    """What one simulated client actor reserves (Flower's `client_resources`) and its torch threads."""

    num_cpus: float
    num_gpus: float
    threads: int


def actor_resources(
    device: str,
    cpus: int,
    gpus: int,
    client_cpus: float | None,
    client_gpus: float | None,
    sampled: int = 1,
) -> ActorResources:
    """On CPU one actor owns every core by default (parallel actors thrash a small machine). On CUDA the
    default packs one actor per client sampled a round onto the GPUs, at most one per core, and shares the
    cores among them: a small base leaves a GPU idle with one client at a time, and five actors ran the
    default round several times faster than one (benchmarks/README.md, "GPU"). Each actor holds its own
    base, so a large base may need --client-gpus 1."""
    if device != "cuda":
        share = client_cpus or cpus
        return ActorResources(share, 0.0, max(1, int(share)))
    per_gpu = client_gpus
    if per_gpu is None:
        per_gpu = 1.0 / max(1, min(math.ceil(sampled / max(gpus, 1)), cpus // max(gpus, 1)))
    actors = max(1, int(gpus / per_gpu + 1e-9)) if gpus else 1
    share = client_cpus or max(1, cpus // actors)
    return ActorResources(share, per_gpu, max(1, int(share)))


def with_device(cfg: Any) -> Any:
    """The run's config with --device resolved on this machine (auto -> cpu or cuda), as the clients and
    config.json see it. On a Ray cluster this machine may hold no GPU: there `auto` means cuda when
    --client-gpus asks for GPUs, and Ray places the actors on nodes that have them."""
    choice = cfg.base.device
    if cfg.federation.ray_address:
        if choice == "auto":
            choice = "cuda" if cfg.federation.client_gpus else "cpu"
        resolved = choice
    else:
        resolved = resolve_device(choice)
    if cfg.federation.client_gpus and resolved != "cuda":
        raise FedpeftError(f"--client-gpus applies to GPU actors; this run's device is {resolved}")
    return replace(cfg, base=replace(cfg.base, device=resolved))
