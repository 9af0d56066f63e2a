"""What the quantized base costs a federation, side by side in one run.

    python benchmarks/quantization.py                      # nf4, int8 and bf16 bases, the default federation
    python benchmarks/quantization.py --quants nf4,bf16 --rounds 3
    python benchmarks/quantization.py --base-only --quants none,bf16,int8,nf4   # no federation: the bases alone

Each variant runs the main command's federation (every option its default but --quant) one after another
on this machine, and reports against the same fp32 base (every run measures it at round 0): the base's
held-out perplexity on the quantized base, the federation's global adapter on that base and on the fp32
base (what a merge gives), the gain against the fp32 base, the base's size in memory and the median local
training step. Prints a markdown table; writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.config.tree import RunConfig  # noqa: E402


def _base_mib(quant: str) -> float:
    from fedpeft.model.base import load_base

    return load_base(replace(RunConfig().base, quant=quant)).nbytes / 2**20


def run(quant: str, rounds: int, work: Path) -> dict:
    from fedpeft.simulation.run import simulate

    cfg = RunConfig()
    cfg = replace(
        cfg,
        base=replace(cfg.base, quant=quant, full_base="fp32"),
        federation=replace(cfg.federation, rounds=rounds),
        train=replace(cfg.train, progress=False),
    )
    start = time.perf_counter()
    h = simulate(cfg, work / quant).history
    first, last = h[0], h[-1]
    steps = [
        c["train"] / cfg.federation.local_steps for r in h[1:] for c in r.get("client_seconds", {}).values()
    ]
    return {
        "quant": quant,
        "base_ppl": first["eval_ppl"],
        "full_base_ppl": first["full_eval_ppl"],
        "ppl": last["eval_ppl"],
        "ppl_on_full_base": last["full_eval_ppl"],
        "vs_base": last["vs_base"],
        "vs_full_base": last["vs_full_base"],
        "ppl_per_round": [r["eval_ppl"] for r in h],
        "step_s": statistics.median(steps),
        "round_s": statistics.median(r["seconds"] for r in h[1:]),
        "wall_s": time.perf_counter() - start,
        "base_mib": _base_mib(quant),
    }


def base_only(quant: str) -> dict:
    """The base alone: held-out perplexity over the default clients' held-out text, its tensors' size, and
    a local training step (the default batch, LoRA, median of 5 after one warm-up)."""
    from fedpeft.data.partition import partition
    from fedpeft.model.adapters import inject
    from fedpeft.model.base import load_base
    from fedpeft.training.local import evaluate, train

    cfg = RunConfig()
    base = load_base(replace(cfg.base, quant=quant))
    f = cfg.federation
    clients = partition(cfg.data, base.tokenizer, f.clients, f.split, f.dirichlet_alpha, f.seed)
    blocks = [b for c in clients for b in c.eval]
    pad = base.tokenizer.pad_token_id
    start = time.perf_counter()
    ppl = evaluate(base.model, blocks, pad, base.compute, cfg.train.eval_batch_size).ppl
    eval_s = time.perf_counter() - start
    model = inject(base, cfg.adapter)
    steps = []
    for _ in range(6):
        r = train(model, clients[0], replace(cfg.train, steps=1, progress=False), 2e-4, pad, base.compute)
        steps.append(r.seconds)
    return {
        "quant": base.quant,
        "base_ppl": ppl,
        "eval_s": eval_s,
        "step_s": statistics.median(steps[1:]),
        "base_mib": base.nbytes / 2**20,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quants", default="nf4,int8,bf16", help="comma-separated --quant values")
    p.add_argument("--rounds", type=int, default=RunConfig().federation.rounds)
    p.add_argument("--base-only", action="store_true", help="the bases alone, no federation")
    a = p.parse_args()
    if a.base_only:
        rows = [base_only(q) for q in a.quants.split(",")]
        ref = next((r for r in rows if r["quant"] == "none"), rows[0])
        print(
            "| base | held-out ppl | vs fp32 | base MiB | train step s | vs fp32's step |\n|---|---|---|---|---|---|"
        )
        for r in rows:
            print(
                f"| {r['quant']} | {r['base_ppl']:.2f} | {r['base_ppl'] / ref['base_ppl'] - 1:+.1%} | "
                f"{r['base_mib']:.0f} | {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f}x |"
            )
        out = Path(__file__).parent / "results" / "quantization-bases.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-quant-") as tmp:
        for quant in a.quants.split(","):
            results.append(run(quant, a.rounds, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    ref = next((r for r in results if r["quant"] == "bf16"), results[-1])
    print(
        f"\nfp32 base: held-out ppl {results[0]['full_base_ppl']:.2f}; default federation, {a.rounds} rounds\n"
    )
    print("| base | base ppl | global adapter, on it | vs its own base | vs the fp32 base | "
          f"gain vs fp32 / {ref['quant']}'s | on the fp32 base (merge) | base MiB | step s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['quant']} | {r['base_ppl']:.2f} | {r['ppl']:.2f} | {r['vs_base']:+.1%} | "
            f"{r['vs_full_base']:+.1%} | {r['vs_full_base'] / ref['vs_full_base']:.2f}x | "
            f"{r['ppl_on_full_base']:.2f} | {r['base_mib']:.0f} | {r['step_s']:.2f} |"
        )
    out = Path(__file__).parent / "results" / "quantization.json"
    out.write_text(json.dumps({"rounds": a.rounds, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
