"""What user-level DP costs the default federation: held-out perplexity at ε = ∞, 8 and 2, central DP
against distributed DP inside secure aggregation, with seconds and bytes a round and the clients' noise time.

    python benchmarks/dp.py                      # ~35 min on 2 cores
    python benchmarks/dp.py --settings lora:inf:plain,lora:8:central,lora:2:central,ia3:inf:plain,ia3:8:central \
        --json benchmarks/results/dp-central-lora.json      # the LoRA/IA3 central table (an earlier version
                                                            # of this script wrote its keys as lora:inf, ...)
    python benchmarks/dp.py --clients 150 --fraction 0.3 --rounds 2 --settings ia3:inf:plain,ia3:8:central \
        --json benchmarks/results/dp-scale.json    # 45 clients a round, ~1 hour on 2 cores

The default model (bf16 under --quant auto) on the default corpus, `--clients` users, each Poisson-sampled
with probability `--fraction` a round (about 10 a round at the defaults), 5 local steps, `--rounds` rounds;
LoRA (the default adapter) and IA3 (about 1/80 of LoRA's parameters: the noise's norm grows with the square
root of the dimension). ε = ∞ is the same federation without DP (fixed-size sampling, example weights).
A setting is adapter:ε:how, how one of plain, secure (SecAgg+ without DP), central (plain rounds),
central+secagg, distributed (SecAgg+ with the clients' discrete noise). The clients' extra time for noise
is their encode-and-mask seconds under distributed DP minus those of secure rounds without DP, against
their training seconds; and, side by side in this process, the encoding of one LoRA-sized delta with and
without noise. One run after another; prints markdown tables and writes benchmarks/results/dp.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(cfg, out: Path) -> dict:
    from fedpeft.simulation.run import simulate

    state = simulate(cfg, out)
    h = state.history
    params = sum(a.size for a in state.travel_arrays().values())
    return {
        "ppl": [round(x["eval_ppl"], 3) for x in h],
        "base_ppl": h[0]["eval_ppl"],
        "final_ppl": h[-1]["eval_ppl"],
        "round_seconds_median": statistics.median(x["seconds"] for x in h[1:]),
        "bytes_up_per_client": h[-1].get("bytes_up", 0) // max(len(h[-1].get("accepted", [])), 1),
        "dp": h[-1].get("dp"),
        "adapter_params": params,
        "client_train_seconds_median": _client_median(h, "train"),
        "client_mask_seconds_median": _client_median(h, "mask"),
    }


def _client_median(history: list[dict], stage: str) -> float | None:
    values = [c[stage] for h in history[1:] for c in h.get("client_seconds", {}).values() if stage in c]
    return statistics.median(values) if values else None


def encode_seconds(dim: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds to encode one clipped delta of `dim` values for the ring, without and with noise."""
    import time

    import numpy as np

    from fedpeft.privacy.distributed import DistributedCode
    from fedpeft.secagg.quantize import RingCode

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, dim)
    x *= 0.8 / np.linalg.norm(x)
    ring = RingCode(clip=0.01, max_clients=12, max_weight=1.0)
    noisy = DistributedCode.for_round(0.8, 1.0, 9, 12, dim + 1)
    out: dict[str, list[float]] = {"ring": [], "noised": []}
    for _ in range(repeats):
        for name, encode in (
            ("ring", lambda: ring.encode(x, 1.0, rng)),
            ("noised", lambda: noisy.encode(x, False, rng, rng)),
        ):
            start = time.perf_counter()
            encode()
            out[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    from fedpeft.config.tree import (
        AdapterConfig,
        BaseConfig,
        FederationConfig,
        PrivacyConfig,
        RunConfig,
        TrainConfig,
    )

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=30)
    p.add_argument("--fraction", type=float, default=0.34)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="default", help="default, or tiny for a smoke run of this script")
    p.add_argument(
        "--settings",
        default="ia3:inf:secure,ia3:8:central+secagg,ia3:8:distributed,ia3:2:central+secagg,ia3:2:distributed",
        help="adapter:epsilon:how,... (module docstring)",
    )
    p.add_argument(
        "--json", default=None, help="where to write the results (default benchmarks/results/dp.json)"
    )
    a = p.parse_args()
    base = RunConfig(
        base=BaseConfig(model=a.model),
        train=TrainConfig(progress=False),
        federation=FederationConfig(clients=a.clients, fraction=a.fraction, rounds=a.rounds, min_clients=1),
    )
    results = {"clients": a.clients, "fraction": a.fraction, "rounds": a.rounds, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fedpeft-dp-") as work:
        for setting in a.settings.split(","):
            kind, eps, how = setting.split(":")
            cfg = replace(base, adapter=AdapterConfig(kind=kind))
            if how in ("secure", "central+secagg", "distributed"):
                cfg = replace(cfg, federation=replace(cfg.federation, secagg=True))
            if eps != "inf":
                mode = "distributed" if how == "distributed" else "central"
                cfg = replace(cfg, privacy=PrivacyConfig(mode=mode, epsilon=float(eps)))
            results["runs"][setting] = run(cfg, Path(work) / setting.replace(":", "-").replace("+", "-"))
            print(json.dumps({setting: results["runs"][setting]}), flush=True)
    results["encode_lora_sized"] = encode_seconds(2_442_240)
    rows = [
        "| adapter | how | ε (δ) | noise multiplier | held-out ppl, bf16 base -> last round | vs no DP | s / round "
        "| bytes up / client | client train / mask s |"
    ]
    rows.append("|---|---|---|---|---|---|---|---|---|")
    runs = results["runs"]
    for setting, r in runs.items():
        kind, _, how = setting.split(":")
        ref = next((v for k, v in runs.items() if k.startswith(f"{kind}:inf:")), None)
        vs = f"{r['final_ppl'] / ref['final_ppl'] - 1:+.1%}" if ref else "-"
        dp = r["dp"]
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:.0e})" if dp else "∞"
        z = f"{dp['noise_multiplier']:.3f}" if dp else "-"
        train, mask = r["client_train_seconds_median"], r["client_mask_seconds_median"]
        times = f"{train:.1f} / {mask:.3f}" if train is not None and mask is not None else "-"
        rows.append(
            f"| {kind} ({r['adapter_params']:,} params) | {how} | {eps} | {z} | {r['base_ppl']:.2f} -> "
            f"{r['final_ppl']:.2f} | {vs} | {r['round_seconds_median']:.1f} | {r['bytes_up_per_client']:,} | {times} |"
        )
    enc = results["encode_lora_sized"]
    rows.append(
        f"\nEncoding one LoRA-sized delta (2,442,240 values): {enc['ring']:.3f} s without noise, "
        f"{enc['noised']:.3f} s with distributed-DP noise ({enc['noised'] / enc['ring']:.2f}x)"
    )
    print("\n".join(rows))
    dest = Path(a.json) if a.json else Path(__file__).resolve().parent / "results" / "dp.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
