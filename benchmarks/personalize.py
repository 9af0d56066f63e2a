"""Personalization benchmark: for each method, how many users their personal adapter serves better than the
global one, by how much, and what it costs on the device; one run.

    python benchmarks/personalize.py            # default model and data: natural split, Dirichlet 0.1 and 1.0
    python benchmarks/personalize.py --quick    # tiny model, to check the script

Every run is the README's main federation (10 clients, 5 rounds, 5 sampled, 5 local steps, NF4 SmolLM2 + LoRA)
with --personalize METHOD. Per user, on the user's held-out text after the last round: the global adapter of
that run, the personal adapter, and the one the device kept (the better on its validation part). finetune
and ditto train the global adapter exactly as plain FedAvg does (same data, seeds and steps), so their
global column is the FedAvg reference; under fedsa the global adapter (shared A, B = 0) computes the base
model, so fedsa is also compared with the FedAvg global of the same split. Writes
benchmarks/results/personalize.json and prints markdown tables.
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

from fedpeft.config.tree import (  # noqa: E402
    BaseConfig,
    DataConfig,
    FederationConfig,
    PersonalConfig,
    RunConfig,
    TrainConfig,
)

METHODS = ("finetune", "fedsa", "ditto")
SPLITS = (("natural", 0.5), ("dirichlet", 0.1), ("dirichlet", 1.0))


def _run(cfg: RunConfig, work: Path, name: str) -> dict:
    from fedpeft.simulation.run import simulate

    start = time.perf_counter()
    state = simulate(cfg, work / name)
    h = state.history
    last = h[-1]
    per_client = last["eval_per_client"]
    train_extra = [s.get("personal", 0.0) for r in h[1:] for s in r.get("client_seconds", {}).values()]
    train_local = [s["train"] for r in h[1:] for s in r.get("client_seconds", {}).values()]
    eval_extra = [
        c["personal_seconds"] for r in h[1:] for c in r["eval_per_client"].values() if "personal_seconds" in c
    ]
    return {
        "name": name,
        "wall_s": time.perf_counter() - start,
        "global_ppl": last["eval_ppl"],
        "summary": last.get("personal"),
        "per_client": {
            u: {k: c.get(k) for k in ("base_ppl", "ppl", "personal_ppl", "kept", "kept_ppl", "note")}
            for u, c in per_client.items()
        },
        # extra on-device seconds: per sampled client per round (training side) and per personal evaluation
        "extra_train_s": statistics.median(train_extra) if train_extra else 0.0,
        "extra_eval_s": statistics.median(eval_extra) if eval_extra else 0.0,
        "personal_evals": len(eval_extra),
        "local_train_s": statistics.median(train_local) if train_local else 0.0,
        "rounds": len(h) - 1,
    }


def _vs(per_client: dict, reference: dict) -> dict:
    """Personal (and kept) perplexity of one run against another run's global adapter, per user."""
    changes = [
        c["personal_ppl"] / reference[u]["ppl"] - 1
        for u, c in per_client.items()
        if c.get("personal_ppl") is not None and u in reference
    ]
    kept = [c["kept_ppl"] / reference[u]["ppl"] - 1 for u, c in per_client.items() if u in reference]
    return {
        "users": len(changes),
        "beats": sum(x < 0 for x in changes),
        "median": statistics.median(changes) if changes else None,
        "worst": max(changes) if changes else None,
        "kept_median": statistics.median(kept) if kept else None,
        "kept_worst": max(kept) if kept else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: checks the script only")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "personalize.json"))
    args = parser.parse_args()
    base = BaseConfig(model="tiny" if args.quick else "default", quant="nf4")
    fed = FederationConfig(clients=10, fraction=0.5, rounds=2 if args.quick else 5, local_steps=5)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-personal-") as tmp:
        for split, alpha in SPLITS:
            key = split if split == "natural" else f"{split}-{alpha}"
            for method in args.methods.split(","):
                cfg = RunConfig(
                    base=base,
                    data=DataConfig(),
                    train=TrainConfig(progress=False),
                    federation=replace(fed, split=split, dirichlet_alpha=alpha),
                    personal=PersonalConfig(method=method),
                )
                r = _run(cfg, Path(tmp), f"{key}-{method}")
                results[f"{key}/{method}"] = r
                s = r["summary"]
                print(
                    f"{key} {method}: global {r['global_ppl']:.2f}; personal beats global "
                    f"{s['beats_global']}/{s['users']}, median {s['median_change']:+.1%}, worst "
                    f"{s['worst_change']:+.1%}; +{r['extra_train_s']:.2f} s/train, +{r['extra_eval_s']:.2f} s/eval; "
                    f"{r['wall_s']:.0f} s",
                    flush=True,
                )
            fedavg = results.get(f"{key}/finetune") or results.get(f"{key}/ditto")
            for method in args.methods.split(","):
                if fedavg is not None:
                    results[f"{key}/{method}"]["vs_fedavg_global"] = _vs(
                        results[f"{key}/{method}"]["per_client"], fedavg["per_client"]
                    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")

    print(
        "\n| split | method | personal < its run's global | median / worst change | personal < FedAvg global "
        "| median / worst change | kept vs FedAvg global: median / worst | extra s per sampled round "
        "| extra s per personal eval | local training s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:+.1%}"

    for name, r in results.items():
        s, v = r["summary"], r.get("vs_fedavg_global", {})
        split, method = name.split("/")
        print(
            f"| {split} | {method} | {s['beats_global']}/{s['users']} | {pct(s['median_change'])} / "
            f"{pct(s['worst_change'])} | {v.get('beats', 'n/a')}/{v.get('users', 'n/a')} | "
            f"{pct(v.get('median'))} / {pct(v.get('worst'))} | {pct(v.get('kept_median'))} / "
            f"{pct(v.get('kept_worst'))} | {r['extra_train_s']:.2f} | {r['extra_eval_s']:.2f} | "
            f"{r['local_train_s']:.2f} |"
        )
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
