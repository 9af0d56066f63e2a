"""The default federation on a GPU next to the same federation on the same machine's CPU cores; one run each.

    python benchmarks/gpu.py          # --device cuda with each --client-gpus, then --device cpu for --cpu-rounds
    python benchmarks/gpu.py --rounds 5 --client-gpus 1,default --cpu-rounds 1 --json benchmarks/results/gpu.json

Every run uses the main command's configuration (`fedpeft simulate` with its defaults: default model, 10 clients,
half sampled per round); only --device and --client-gpus differ (the CPU run may stop earlier: each round time is a
median over its own rounds). Prints a markdown table: median round seconds, clients trained per hour, held-out
perplexity, peak GPU memory of a client, and each run's round time over the first GPU run's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.config.tree import RunConfig, sampled_per_round  # noqa: E402


def run(device: str, rounds: int, work: Path, client_gpus: float | None = None) -> dict:
    from fedpeft.simulation.run import simulate

    cfg = RunConfig()
    cfg = replace(
        cfg,
        base=replace(cfg.base, device=device),
        train=replace(cfg.train, progress=False),
        federation=replace(cfg.federation, rounds=rounds, client_gpus=client_gpus),
    )
    start = time.perf_counter()
    state = simulate(cfg, work / f"{device}-{client_gpus}")
    h = state.history
    trained = [r for r in h[1:] if not r.get("skipped")]
    f = cfg.federation
    per_round = sampled_per_round(f.clients, f.fraction, f.min_clients)
    round_s = statistics.median(r["seconds"] for r in trained)
    gpu = [c["gpu_peak_mib"] for r in trained for c in r["client_seconds"].values() if "gpu_peak_mib" in c]
    return {
        "device": h[0].get("device", device),
        "client_gpus": "default" if client_gpus is None and device == "cuda" else client_gpus,
        "rounds": len(trained),
        "round_s": round_s,
        "round_s_all": [r["seconds"] for r in trained],
        "train_s_max": statistics.median(r["train_seconds_max"] for r in trained),
        "eval_s": statistics.median(r.get("eval_seconds", 0.0) for r in trained),
        "clients_per_hour": per_round * 3600 / round_s,
        "ppl_start": h[0]["eval_ppl"],
        "ppl": h[-1]["eval_ppl"],
        "gpu_peak_mib": max(gpu) if gpu else None,
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds of the GPU run (default: %(default)s)")
    p.add_argument(
        "--client-gpus",
        type=lambda v: [None if x == "default" else float(x) for x in v.split(",")],
        default=[1.0, None],
        help="GPU runs, one per --client-gpus value ('default': fedpeft's packing); default: 1,default",
    )
    p.add_argument("--cpu-rounds", type=int, default=1, help="rounds of the CPU run; 0 skips it")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: torch sees no CUDA GPU")
    machine = {
        "gpu": torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory(prefix="fedpeft-gpu-") as tmp:
        results = [run("cuda", a.rounds, Path(tmp), g) for g in a.client_gpus]
        if a.cpu_rounds:
            results.append(run("cpu", a.cpu_rounds, Path(tmp)))
    print(f"\n{machine['gpu']}, {machine['cpus']} CPU cores, torch {machine['torch']}\n")
    print("| device | --client-gpus | rounds | round s (median) | vs first | slowest client's training s "
          "| evaluation s | clients/hour | held-out ppl | client's peak GPU MiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        gpu = f"{r['gpu_peak_mib']:.0f}" if r["gpu_peak_mib"] else "-"
        print(
            f"| {r['device']} | {r['client_gpus'] or '-'} | {r['rounds']} | {r['round_s']:.2f} "
            f"| {r['round_s'] / results[0]['round_s']:.2f}x | {r['train_s_max']:.2f} | {r['eval_s']:.2f} "
            f"| {r['clients_per_hour']:,.0f} | {r['ppl_start']:.2f} -> {r['ppl']:.2f} | {gpu} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
