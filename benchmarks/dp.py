"""What user-level DP costs the default federation: held-out perplexity at ε = ∞, 8 and 2 (central DP).

    python benchmarks/dp.py                      # ~30 min on 2 cores
    python benchmarks/dp.py --clients 30 --rounds 3 --fraction 0.34

The default model (bf16 under --quant auto) on the default corpus, `--clients` users, each Poisson-sampled
with probability `--fraction` a round (about 10 a round at the defaults), 5 local steps, `--rounds` rounds;
LoRA (the default adapter) and IA3 (about 1/80 of LoRA's parameters: the noise's norm grows with the square
root of the dimension). ε = ∞ is the same federation without DP (fixed-size sampling, example weights).
One run after another in this process; prints a markdown table and writes benchmarks/results/dp.json.
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
    from fedpeft.simulate import simulate

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
    }


def main() -> None:
    from fedpeft.config import (
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
    p.add_argument("--settings", default="lora:inf,lora:8,lora:2,ia3:inf,ia3:8", help="adapter:epsilon,...")
    a = p.parse_args()
    base = RunConfig(
        base=BaseConfig(model=a.model),
        train=TrainConfig(progress=False),
        federation=FederationConfig(clients=a.clients, fraction=a.fraction, rounds=a.rounds, min_clients=1),
    )
    results = {"clients": a.clients, "fraction": a.fraction, "rounds": a.rounds, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fedpeft-dp-") as work:
        for setting in a.settings.split(","):
            kind, eps = setting.split(":")
            cfg = replace(base, adapter=AdapterConfig(kind=kind))
            if eps != "inf":
                cfg = replace(cfg, privacy=PrivacyConfig(mode="central", epsilon=float(eps)))
            results["runs"][setting] = run(cfg, Path(work) / setting.replace(":", "-"))
            print(json.dumps({setting: results["runs"][setting]}), flush=True)
    rows = [
        "| adapter | ε (δ) | noise multiplier | held-out ppl, bf16 base -> last round | vs no DP | s / round |"
    ]
    rows.append("|---|---|---|---|---|---|")
    for setting, r in results["runs"].items():
        kind = setting.split(":")[0]
        ref = results["runs"].get(f"{kind}:inf")
        vs = f"{r['final_ppl'] / ref['final_ppl'] - 1:+.1%}" if ref else "-"
        dp = r["dp"]
        eps = f"{dp['epsilon']:.2f} ({dp['delta']:.0e})" if dp else "∞"
        z = f"{dp['noise_multiplier']:.3f}" if dp else "-"
        rows.append(
            f"| {kind} ({r['adapter_params']:,} params) | {eps} | {z} | {r['base_ppl']:.2f} -> {r['final_ppl']:.2f} "
            f"| {vs} | {r['round_seconds_median']:.1f} |"
        )
    print("\n".join(rows))
    dest = Path(__file__).resolve().parent / "results" / "dp.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
