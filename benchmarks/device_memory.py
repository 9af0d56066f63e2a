"""What a device needs in memory, by model, quantization, LoRA rank and batch: the figure to give
`fedpeft client --max-memory` (the device's whole process tree, PSS).

    python benchmarks/device_memory.py              # the default model (~30 s: loads it once per quantization)

For each setting: the worker's estimated peak (fedpeft.model.memory.peak_mib, the estimate --max-memory
itself uses, calibrated to measured peaks by benchmarks/memory.py --calibrate; it overestimates by design),
plus what the device held beside its worker, measured (benchmarks/results/deploy.json: the tree's PSS
minus the worker's RSS). Prints a markdown table; writes benchmarks/results/device-memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpeft.config.tree import AdapterConfig, BaseConfig, TrainConfig  # noqa: E402

RANKS = (8, 16, 32)
BATCHES = ((4, 128), (1, 128), (4, 256))  # (sequences, tokens each) per optimizer step


def lora_params(model: object, cfg: AdapterConfig, r: int) -> int:
    """LoRA's trainable parameters at rank r: r x (in + out) for every targeted linear layer."""
    import torch

    targets = set(cfg.target_modules)
    total = 0
    for name, module in model.named_modules():  # type: ignore[attr-defined]
        if name.rsplit(".", 1)[-1] in targets and hasattr(module, "in_features"):
            total += r * (module.in_features + module.out_features)
        elif name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Module):
            raise SystemExit(f"{name}: not a linear layer")
    return total


def beside_worker() -> float | None:
    """MiB a device held beyond its worker in the last deployment benchmark: the worst device's sampled
    tree PSS minus its worker's peak RSS. The worker's PSS is at most its RSS, so this is at most what the
    SuperNode and the supervisor hold (their PSS); the worker's estimate, an RSS, makes up the rest."""
    path = ROOT / "benchmarks" / "results" / "deploy.json"
    try:
        d = json.loads(path.read_text())["default_3_deploy"]
        name = max(d["client_peak_pss_mib"], key=d["client_peak_pss_mib"].get)
        return float(d["client_peak_pss_mib"][name] - d["worker_peak_rss_mib"][name])
    except (OSError, KeyError, ValueError):
        return None


def main() -> None:
    from fedpeft.model.base import load_base
    from fedpeft.model.memory import Shape, peak_mib

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--quants", default="bf16,nf4")
    a = p.parse_args()
    train, adapter = TrainConfig(), AdapterConfig()
    others = beside_worker()
    rows, out = [], []
    for quant in a.quants.split(","):
        base = load_base(BaseConfig(model=a.model, quant=quant))
        shape = Shape.of(base.model.config)
        act_bytes = 4 if base.compute == "fp32" else 2
        for r in RANKS:
            params = lora_params(base.model, adapter, r)
            for batch, block in BATCHES:
                worker = peak_mib(
                    shape,
                    base.nbytes,
                    params,
                    batch * block,
                    train.checkpointing,
                    train.loss_chunk,
                    False,
                    act_bytes,
                )
                device = worker + others if others is not None else None
                out.append(
                    {"quant": quant, "compute": base.compute, "r": r, "batch": batch, "block": block,
                     "lora_params": params, "worker_mib": round(worker), "device_mib": device and round(device)}
                )  # fmt: skip
                rows.append(
                    f"| {quant} ({base.compute}) | {r} | {batch} x {block} | {params / 1e6:.2f} M | "
                    f"{math.ceil(worker)} | {math.ceil(device) if device else '-'} |"
                )
    print(
        f"model {a.model}; beside the worker: {others:.0f} MiB (tree PSS - worker RSS, measured)"
        if others
        else ""
    )
    print("| base | LoRA r | batch | adapter | worker, estimated (MiB) | device, --max-memory (MiB) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    dest = ROOT / "benchmarks" / "results" / "device-memory.json"
    dest.write_text(json.dumps({"model": a.model, "beside_worker_mib": others, "rows": out}, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
